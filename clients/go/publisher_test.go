package nerve_test

// The Publisher: pipelined publishing on one PublishStream.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// openPublisher opens a Publisher for the test and closes it when the test ends.
func openPublisher(t *testing.T, client *nerve.Client, ctx context.Context) *nerve.Publisher {
	t.Helper()
	pub, err := client.OpenPublisher(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

func TestPublisherPipelinesConcurrentCalls(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub := openPublisher(t, client, ctx)
	const goroutines, calls = 20, 25
	sequences := make([][]uint64, goroutines) // per goroutine, in call order
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range calls {
				// every third call is a batch of two: one request, consecutive sequences
				batch := []*nervepb.Event{ev(fmt.Sprintf("g%d-c%d-a", g, i), "pipe.x")}
				if i%3 == 0 {
					batch = append(batch, ev(fmt.Sprintf("g%d-c%d-b", g, i), "pipe.x"))
				}
				results, err := pub.Publish(ctx, batch...)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d call %d: %w", g, i, err)
					return
				}
				if len(results) != len(batch) {
					errs <- fmt.Errorf("goroutine %d call %d: %d results for %d events", g, i, len(results), len(batch))
					return
				}
				for j, r := range results {
					if r.GetId() != batch[j].GetId() || r.GetDuplicate() {
						errs <- fmt.Errorf("goroutine %d call %d: result %v for %s", g, i, r, batch[j].GetId())
						return
					}
					if j > 0 && r.GetSequence() != results[j-1].GetSequence()+1 {
						errs <- fmt.Errorf("goroutine %d call %d: batch sequences %v", g, i, results)
						return
					}
					sequences[g] = append(sequences[g], r.GetSequence())
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	seen := map[uint64]bool{}
	for g, seqs := range sequences {
		for i, seq := range seqs {
			if seen[seq] {
				t.Fatalf("sequence %d given twice", seq)
			}
			seen[seq] = true
			if i > 0 && seq <= seqs[i-1] {
				t.Fatalf("goroutine %d: sequences not increasing: %v", g, seqs)
			}
		}
	}
	want := goroutines * (calls + (calls+2)/3)
	if len(seen) != want {
		t.Fatalf("%d sequences, want %d", len(seen), want)
	}
	if err := pub.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func TestPublisherRefusedRequestKeepsTheStream(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub := openPublisher(t, client, ctx)

	if _, err := pub.Publish(ctx); err == nil {
		t.Fatal("publishing no events is an error")
	} else if _, direct := client.Publish(ctx); direct == nil || err.Error() != direct.Error() {
		t.Fatalf("no events: %v, Client.Publish: %v", err, direct)
	}

	bad := nerve.NewEvent("//tests", "").ID("no-type").MustBuild()
	_, err := pub.Publish(ctx, bad)
	var e *nerve.Error
	if !errors.As(err, &e) || !errors.Is(err, nerve.ErrInvalidArgument) || nerve.Code(err) != codes.InvalidArgument ||
		status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty type: want InvalidArgument, got %v", err)
	}
	_, direct := client.Publish(ctx, bad)
	var de *nerve.Error
	if !errors.As(direct, &de) || de.Code != e.Code || de.Message != e.Message ||
		!slices.Equal(de.FieldViolations, e.FieldViolations) {
		t.Fatalf("stream refusal %v differs from Client.Publish %v", err, direct)
	}
	if _, ok := e.Violation("events[0].type"); !ok {
		t.Fatalf("no violation of events[0].type in %v", e.FieldViolations)
	}

	first, err := pub.Publish(ctx, ev("same-id", "refuse.x"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := pub.Publish(ctx, ev("same-id", "refuse.x"))
	if err != nil || !again[0].GetDuplicate() || again[0].GetSequence() != first[0].GetSequence() {
		t.Fatalf("retry: %v, %v", again, err)
	}
	changed := nerve.NewEvent("//tests", "refuse.x").ID("same-id").Text("other content").MustBuild()
	if _, err := pub.Publish(ctx, changed); !errors.Is(err, nerve.ErrAlreadyExists) {
		t.Fatalf("conflicting reuse: want AlreadyExists, got %v", err)
	}

	later, err := pub.Publish(ctx, ev("after-refusals", "refuse.x"))
	if err != nil {
		t.Fatalf("publish after refusals: %v", err)
	}
	if later[0].GetSequence() <= first[0].GetSequence() {
		t.Fatalf("sequence %d after %d", later[0].GetSequence(), first[0].GetSequence())
	}
	if err := pub.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func TestPublisherMessageOverTheServersLimitEndsTheStream(t *testing.T) {
	// batches of at most 64 KiB, so messages of at most 1 MiB + 64 KiB
	client, ctx := connect(t, "NERVE_LIMITS__MAX_BATCH_BYTES=65536", "NERVE_LIMITS__MAX_EVENT_BYTES=65536"), testContext(t)
	pub := openPublisher(t, client, ctx)
	batch := func(prefix string, n, size int) []*nervepb.Event {
		evs := make([]*nervepb.Event, n)
		for i := range evs {
			evs[i] = nerve.NewEvent("//tests", "limit.x").ID(fmt.Sprint(prefix, i)).Text(strings.Repeat("x", size)).MustBuild()
		}
		return evs
	}
	// over the batch limit but readable: that request is refused, the stream goes on
	if _, err := pub.Publish(ctx, batch("large-", 2, 40_000)...); !errors.Is(err, nerve.ErrResourceExhausted) {
		t.Fatalf("a batch over max_batch_bytes: want ResourceExhausted, got %v", err)
	}
	if _, err := pub.Publish(ctx, ev("before", "limit.x")); err != nil {
		t.Fatalf("publish after a refused batch: %v", err)
	}
	// a message over the limit cannot be read: the server ends the stream with RESOURCE_EXHAUSTED, which
	// that call, every later one and Close return
	if _, err := pub.Publish(ctx, batch("huge-", 20, 60_000)...); !errors.Is(err, nerve.ErrResourceExhausted) {
		t.Fatalf("a message over the server's limit: want ResourceExhausted, got %v", err)
	}
	if _, err := pub.Publish(ctx, ev("after", "limit.x")); !errors.Is(err, nerve.ErrResourceExhausted) {
		t.Fatalf("publish after the stream ended: want ResourceExhausted, got %v", err)
	}
	if err := pub.Close(); !errors.Is(err, nerve.ErrResourceExhausted) {
		t.Fatalf("close: want ResourceExhausted, got %v", err)
	}
	if _, err := client.GetEvent(ctx, "after", "//tests"); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("the call after the end was not sent: want NotFound, got %v", err)
	}
}

func TestPublisherCloseWaitsForOutstandingAnswers(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub, err := client.OpenPublisher(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const goroutines, batch = 20, 10
	var published atomic.Int64 // successful calls
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := 0; ; i++ {
				events := make([]*nervepb.Event, batch)
				for j := range events {
					events[j] = ev(fmt.Sprintf("g%d-c%d-e%d", g, i, j), "closing.pub")
				}
				results, err := pub.Publish(ctx, events...)
				switch {
				case errors.Is(err, nerve.ErrPublisherClosed):
					return
				case err != nil: // a call sent before Close must be answered, not failed
					errs <- fmt.Errorf("goroutine %d call %d: %w", g, i, err)
					return
				case len(results) != batch:
					errs <- fmt.Errorf("goroutine %d call %d: %d results", g, i, len(results))
					return
				}
				published.Add(1)
			}
		})
	}
	eventually(t, "calls to be answered", func() (int64, bool) { n := published.Load(); return n, n >= 100 })
	if err := pub.Close(); err != nil { // with calls in flight on every goroutine
		t.Fatalf("close: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// every answered call was stored, and no call was stored unanswered
	types, err := client.ListEventTypes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(types) != 1 || types[0].GetCount() != uint64(published.Load()*batch) {
		t.Fatalf("stored %v, answered %d calls of %d", types, published.Load(), batch)
	}

	start := time.Now()
	if _, err := pub.Publish(ctx, ev("too-late", "closing.pub")); !errors.Is(err, nerve.ErrPublisherClosed) {
		t.Fatalf("publish after close: %v", err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("publish after close did not fail at once")
	}
	if err := pub.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

func TestPublisherFailsOnceTheStreamBroke(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	streamCtx, cancel := context.WithCancel(ctx)
	pub, err := client.OpenPublisher(streamCtx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Publish(ctx, ev("before-break", "broken.x")); err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := pub.Publish(ctx, ev("after-break", "broken.x")); nerve.Code(err) != codes.Canceled {
		t.Fatalf("publish on a cancelled stream: %v", err)
	}
	if err := pub.Close(); nerve.Code(err) != codes.Canceled {
		t.Fatalf("close of a cancelled stream: %v", err)
	}
}

// fakeBus serves PublishStream in a way the real server never does: refusing the stream at once with
// refuse, never answering the opening (silent), answering it and then reading nothing (deaf), answering
// each request with a refusal whose code is OK (okRefusal), or else answering each request with the wrong
// request id.
type fakeBus struct {
	nervepb.UnimplementedEventBusServer
	refuse    error
	silent    bool
	deaf      bool
	okRefusal bool
}

func (b fakeBus) PublishStream(stream grpc.BidiStreamingServer[nervepb.PublishStreamRequest, nervepb.PublishStreamResponse]) error {
	if b.refuse != nil {
		return b.refuse
	}
	if b.silent {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	// like the real server, answer the opening at once (grpc-go would send the headers with the first answer)
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	if b.deaf { // HTTP/2 flow control holds the client's sending once the window is full
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	for {
		req, err := stream.Recv()
		if err != nil {
			return nil
		}
		if b.okRefusal {
			refusal := &nervepb.PublishStreamResponse_Error{Error: &nervepb.PublishError{Code: 0, Message: "refused, code OK"}}
			if err := stream.Send(&nervepb.PublishStreamResponse{RequestId: req.GetRequestId(), Outcome: refusal}); err != nil {
				return err
			}
			continue
		}
		published := &nervepb.PublishStreamResponse_Published{Published: &nervepb.PublishResponse{}}
		if err := stream.Send(&nervepb.PublishStreamResponse{RequestId: req.GetRequestId() + 1, Outcome: published}); err != nil {
			return err
		}
	}
}

// connectFake serves bus on a local port for this test and returns a client connected to it.
func connectFake(t *testing.T, bus fakeBus) *nerve.Client {
	t.Helper()
	return connectServing(t, func(s *grpc.Server) { nervepb.RegisterEventBusServer(s, bus) })
}

// connectServing serves what register adds on a local port for this test and returns a client connected
// to it, dialed with opts.
func connectServing(t *testing.T, register func(*grpc.Server), opts ...grpc.DialOption) *nerve.Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	register(server)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client, err := nerve.Dial(listener.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// signalSends is a client stream that tells sending of each message as it starts to send it.
type signalSends struct {
	grpc.ClientStream
	sending chan<- struct{}
}

func (s signalSends) SendMsg(m any) error {
	s.sending <- struct{}{}
	return s.ClientStream.SendMsg(m)
}

func TestPublisherCloseContextEndsAPublishHeldInSending(t *testing.T) {
	sending := make(chan struct{}, 2)
	signal := grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		stream, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return signalSends{ClientStream: stream, sending: sending}, nil
	})
	ctx := testContext(t)
	client := connectServing(t, func(s *grpc.Server) { nervepb.RegisterEventBusServer(s, fakeBus{deaf: true}) }, signal)
	pub, err := client.OpenPublisher(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sent := func(what string) {
		t.Helper()
		select {
		case <-sending:
		case <-time.After(wait):
			t.Fatalf("%s did not start sending within %s", what, wait)
		}
	}
	// a first batch of 32 MiB: grpc-go takes it in whole, but a server that reads nothing lets through 16
	// MiB at most (its flow control window, grown to the most), so a second one is held in sending
	big := make([]*nervepb.Event, 8)
	for i := range big {
		big[i] = nerve.NewEvent("//tests", "deaf.x").ID(fmt.Sprintf("big-%d", i)).Text(strings.Repeat("x", 4<<20)).MustBuild()
	}
	answers := make(chan error, 2)
	go func() { _, err := pub.Publish(ctx, big...); answers <- err }()
	sent("the first publish")
	go func() { _, err := pub.Publish(ctx, ev("held", "deaf.x")); answers <- err }()
	sent("the second publish")

	closeCtx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	closed := within(t, "close with a publish held in sending", func() error { return pub.CloseContext(closeCtx) })
	if !errors.Is(closed, context.DeadlineExceeded) || !errors.Is(closed, nerve.ErrDeadlineExceeded) {
		t.Fatalf("close that gave up: %v, want its context's error", closed)
	}
	for range 2 {
		if err := within(t, "a publish on the cancelled stream", func() error { return <-answers }); nerve.Code(err) != codes.Canceled {
			t.Fatalf("a publish unanswered when close gave up: %v, want Canceled", err)
		}
	}
	if again := within(t, "a second close", pub.Close); again != closed {
		t.Fatalf("second close: %v, first: %v", again, closed)
	}
	if _, err := pub.Publish(ctx, ev("after", "deaf.x")); !errors.Is(err, nerve.ErrPublisherClosed) {
		t.Fatalf("publish after close: %v", err)
	}
}

func TestPublisherFailsTheStreamOnAMisnumberedAnswer(t *testing.T) {
	client, ctx := connectFake(t, fakeBus{}), testContext(t)
	pub, err := client.OpenPublisher(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Publish(ctx, ev("m1", "misnumbered.x")); err == nil {
		t.Fatal("an answer to another request was taken")
	}
	if _, err := pub.Publish(ctx, ev("m2", "misnumbered.x")); err == nil {
		t.Fatal("the publisher kept a misnumbered stream")
	}
	if err := pub.Close(); err == nil {
		t.Fatal("close hid the misnumbered stream")
	}
}

func TestOpenPublisherReturnsAStreamLevelRefusal(t *testing.T) {
	refusal := status.Error(codes.Unauthenticated, "no credentials")
	client, ctx := connectFake(t, fakeBus{refuse: refusal}), testContext(t)
	pub, err := client.OpenPublisher(ctx)
	var e *nerve.Error
	if pub != nil || !errors.As(err, &e) || !errors.Is(err, nerve.ErrUnauthenticated) || e.Message != "no credentials" {
		t.Fatalf("opening a refused stream: publisher %t, error %v", pub != nil, err)
	}
}

func TestOpenPublisherWaitsForTheOpeningOnlyAsLongAsItsContext(t *testing.T) {
	client := connectFake(t, fakeBus{silent: true})
	ctx, cancel := context.WithTimeout(testContext(t), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	pub, err := client.OpenPublisher(ctx)
	if pub != nil || !errors.Is(err, nerve.ErrDeadlineExceeded) {
		t.Fatalf("opening a stream the server never answers: publisher %t, error %v", pub != nil, err)
	}
	if waited := time.Since(start); waited > wait {
		t.Fatalf("the open waited %s past its context", waited)
	}
}

func TestOpenPublisherReturnsTheStreamLimitRefusal(t *testing.T) {
	client, ctx := connect(t, "NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL=1"), testContext(t)
	first, err := client.OpenPublisher(ctx)
	if err != nil {
		t.Fatal(err)
	}
	second, err := client.OpenPublisher(ctx)
	var e *nerve.Error
	if second != nil || !errors.As(err, &e) || !errors.Is(err, nerve.ErrResourceExhausted) ||
		!strings.Contains(e.Message, "open streams and waiting requests, the most allowed per principal") {
		t.Fatalf("a second stream over a limit of one: publisher %t, error %v", second != nil, err)
	}
	if _, err := first.Publish(ctx, ev("held", "limit.x")); err != nil {
		t.Fatalf("publish on the stream that holds the limit: %v", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	// the server frees the stream's slot as its stream task ends, just after the stream ended
	again := eventually(t, "a publisher to open after the first closed", func() (*nerve.Publisher, bool) {
		pub, err := client.OpenPublisher(ctx)
		if err != nil && !errors.Is(err, nerve.ErrResourceExhausted) {
			t.Fatalf("reopening: %v", err)
		}
		return pub, err == nil
	})
	if _, err := again.Publish(ctx, ev("after", "limit.x")); err != nil {
		t.Fatalf("publish on the reopened stream: %v", err)
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestPublisherTakesARefusalWithCodeOKAsAnError(t *testing.T) {
	client, ctx := connectFake(t, fakeBus{okRefusal: true}), testContext(t)
	pub := openPublisher(t, client, ctx)
	results, err := pub.Publish(ctx, ev("ok1", "okrefusal.x"))
	if nerve.Code(err) != codes.Unknown {
		t.Fatalf("a refusal with code OK read as %v, results %v", err, results)
	}
}

func TestPublisherReturnsTheContextsError(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub := openPublisher(t, client, ctx)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	_, err := pub.Publish(cancelled, ev("never", "ctx.x"))
	if !errors.Is(err, context.Canceled) || nerve.Code(err) != codes.Canceled {
		t.Fatalf("publish with a cancelled context: %v", err)
	}
	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	_, err = pub.Publish(expired, ev("never", "ctx.x"))
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, nerve.ErrDeadlineExceeded) ||
		nerve.Code(err) != codes.DeadlineExceeded || status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("publish with an expired context: %v", err)
	}
	if _, err := pub.Publish(ctx, ev("after", "ctx.x")); err != nil {
		t.Fatalf("publish after calls that gave up: %v", err)
	}
}

func TestPublisherRefusesAStringThatIsNotUTF8AndKeepsTheStream(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub := openPublisher(t, client, ctx)
	for field, bad := range map[string]*nervepb.Event{
		"events[1].subject":   nerve.NewEvent("//tests", "utf8.x").ID("bad-subject").Subject("eu-\xff").MustBuild(),
		"events[1].text_data": nerve.NewEvent("//tests", "utf8.x").ID("bad-data").Text("\xff").MustBuild(),
		`events[1].extensions["tenant"].string_value`: nerve.NewEvent("//tests", "utf8.x").ID("bad-extension").
			Extension("tenant", "eu-\xff").MustBuild(),
	} {
		// protobuf cannot encode it: sent, it would end the stream and fail every call pending on it
		_, err := pub.Publish(ctx, ev("good", "utf8.x"), bad)
		e := wantViolation(t, err, field)
		_, direct := client.Publish(ctx, ev("good", "utf8.x"), bad)
		var de *nerve.Error
		if !errors.As(direct, &de) || de.Code != e.Code || de.Message != e.Message ||
			!slices.Equal(de.FieldViolations, e.FieldViolations) {
			t.Fatalf("stream refusal %v differs from Client.Publish %v", err, direct)
		}
	}
	if _, err := pub.Publish(ctx, ev("after", "utf8.x")); err != nil {
		t.Fatalf("publish after the refusals: %v", err)
	}
	if _, err := client.GetEvent(ctx, "good", "//tests"); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("a refused batch was stored in part: want NotFound, got %v", err)
	}
	if err := pub.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

// heldSends is a client stream that tells sending of each publish request it is asked to send, then
// sends it only once proceed lets it, stop is closed or the stream ended.
type heldSends struct {
	grpc.ClientStream
	sending       chan<- *nervepb.PublishStreamRequest
	proceed, stop <-chan struct{}
}

func (s heldSends) SendMsg(m any) error {
	if req, ok := m.(*nervepb.PublishStreamRequest); ok {
		s.sending <- req
		select {
		case <-s.proceed:
		case <-s.stop:
		case <-s.Context().Done():
		}
	}
	return s.ClientStream.SendMsg(m)
}

// pausedContext is a context whose first Err call, which Publish makes before it waits for its turn to
// send, finds the context's state, tells paused and returns what it found only once resume is closed:
// as if the calling goroutine were descheduled right after that check.
type pausedContext struct {
	context.Context
	paused, resume chan struct{}
	once           sync.Once
}

func (c *pausedContext) Err() error {
	err := c.Context.Err()
	c.once.Do(func() {
		close(c.paused)
		<-c.resume
	})
	return err
}

func TestPublisherSendsNothingForACallWhoseContextEndedWhileItWaitedToSend(t *testing.T) {
	sending, proceed, stop := make(chan *nervepb.PublishStreamRequest, 1), make(chan struct{}), make(chan struct{})
	hold := grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		stream, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return heldSends{ClientStream: stream, sending: sending, proceed: proceed, stop: stop}, nil
	})
	client, ctx := dialWith(t, startServer(t), hold), testContext(t)
	pub := openPublisher(t, client, ctx)
	t.Cleanup(func() { close(stop) }) // before the publisher's Close: a send still held goes on
	sent := func(what string) *nervepb.PublishStreamRequest {
		t.Helper()
		select {
		case req := <-sending:
			return req
		case <-time.After(wait):
			t.Fatalf("%s did not start sending within %s", what, wait)
			return nil
		}
	}
	// Each round: a call held in sending keeps the send turn; a second call checks its context (live) and
	// waits for the turn; its context ends, and the first call's turn ends, before it looks again. Both are
	// there when it does: a select would take either, so without the check after taking the turn, a round
	// sends the late batch with probability 1/2, and all rounds pass by luck with 2^-30, about 1e-9.
	const rounds = 30
	for r := range rounds {
		first := make(chan error, 1)
		go func() { _, err := pub.Publish(ctx, ev(fmt.Sprintf("turn-%d", r), "turn.x")); first <- err }()
		if req := sent("the first publish"); req.GetEvents()[0].GetId() != fmt.Sprintf("turn-%d", r) {
			t.Fatalf("round %d: sending %v, want the first publish", r, req)
		}
		lateCtx, cancel := context.WithCancel(ctx)
		late := &pausedContext{Context: lateCtx, paused: make(chan struct{}), resume: make(chan struct{})}
		lateErr := make(chan error, 1)
		go func() { _, err := pub.Publish(late, ev(fmt.Sprintf("late-%d", r), "turn.x")); lateErr <- err }()
		select {
		case <-late.paused:
		case <-time.After(wait):
			t.Fatalf("round %d: the late publish did not check its context within %s", r, wait)
		}
		cancel()
		proceed <- struct{}{}
		// the first call gives the send turn up before it waits for its answer
		if err := within(t, "the first publish", func() error { return <-first }); err != nil {
			t.Fatalf("round %d: first publish: %v", r, err)
		}
		close(late.resume)
		select {
		case req := <-sending:
			t.Fatalf("round %d: a call whose context ended while it waited to send sent %v", r, req)
		case err := <-lateErr:
			if !errors.Is(err, context.Canceled) || nerve.Code(err) != codes.Canceled {
				t.Fatalf("round %d: a call whose context ended while it waited to send: %v", r, err)
			}
		case <-time.After(wait):
			t.Fatalf("round %d: the late publish did not return within %s", r, wait)
		}
	}
	if err := pub.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := client.GetEvent(ctx, "late-0", "//tests"); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("a batch whose call gave up before sending was stored: want NotFound, got %v", err)
	}
}

// answeredSends is a client stream that, for a send armed with a cancel func, returns from sending only
// once the answer to that request was handed to its Publish call, after calling the cancel.
type answeredSends struct {
	grpc.ClientStream
	*answers
}

// answers is what the streams of answeredSends count: their sends and receives.
type answers struct {
	armed   chan context.CancelFunc
	entered chan struct{} // one per RecvMsg call, as it starts
	// only SendMsg uses these, and Publish sends one request at a time
	sends, receives int
}

func (s answeredSends) RecvMsg(m any) error {
	s.entered <- struct{}{}
	return s.ClientStream.RecvMsg(m)
}

func (s answeredSends) SendMsg(m any) error {
	err := s.ClientStream.SendMsg(m)
	s.sends++
	select {
	case cancel := <-s.armed:
		// the Publisher's receiver asks for the next message only after it handed over the answer it
		// read: the n-th answer is handed over once the receive after it, the (n+1)-th, started
		for s.receives < s.sends+1 {
			select {
			case <-s.entered:
				s.receives++
			case <-s.Context().Done():
				return err
			}
		}
		cancel()
	default:
	}
	return err
}

func TestPublisherReturnsAnAnswerThatCameBeforeItsContextEnded(t *testing.T) {
	const rounds = 30
	counts := &answers{armed: make(chan context.CancelFunc, 1), entered: make(chan struct{}, 2*rounds)}
	answered := grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		stream, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return answeredSends{ClientStream: stream, answers: counts}, nil
	})
	client, ctx := dialWith(t, startServer(t), answered), testContext(t)
	pub := openPublisher(t, client, ctx)
	// each call's answer has come and its context has ended when it looks for either: a select would take
	// either, so without looking at the answer first, a round fails with probability 1/2, and all rounds
	// pass by luck with 2^-30, about 1e-9
	for r := range rounds {
		callCtx, cancel := context.WithCancel(ctx)
		counts.armed <- cancel
		results, err := pub.Publish(callCtx, ev(fmt.Sprintf("answered-%d", r), "answered.x"))
		cancel()
		if err != nil || len(results) != 1 || results[0].GetSequence() != uint64(r+1) {
			t.Fatalf("round %d: a publish answered before its context ended: %v, %v", r, results, err)
		}
	}
	if err := pub.Close(); err != nil {
		t.Fatal(err)
	}
}
