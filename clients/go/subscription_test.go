package nerve_test

// The Subscription beyond the shared scenarios: a stream that ends with deliveries unread, acks sent just
// before the end (Close, a cancel), Close's bound, concurrent readers of its state, the heartbeat timeout
// with an application that does not read, settle arguments checked before sending, settling no delivery.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// within runs call and returns its error, failing the test if it does not return within wait.
func within(t *testing.T, what string, call func() error) error {
	t.Helper()
	returned := make(chan error, 1)
	go func() { returned <- call() }()
	select {
	case err := <-returned:
		return err
	case <-time.After(wait):
		t.Fatalf("%s did not return within %s", what, wait)
		return nil
	}
}

// unreadWindow is more deliveries than a Subscription buffers for Next, so its reader waits for room.
const unreadWindow = 64

// endWithDeliveriesUnread opens a group subscription, has the server hand it unreadWindow deliveries, reads
// one (returned) and deletes the group, which makes the server end the stream with NOT_FOUND as soon as
// it next claims for the group (once a settle frees a credit).
func endWithDeliveriesUnread(t *testing.T, client *nerve.Client, ctx context.Context, group string) (*nerve.Subscription, *nerve.Delivery) {
	t.Helper()
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{group + ".x"}, Group: group, MaxInFlight: unreadWindow})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Close() })
	events := make([]*nervepb.Event, unreadWindow)
	for i := range events {
		events[i] = ev(fmt.Sprintf("%s-%d", group, i), group+".x")
	}
	if _, err := client.Publish(ctx, events...); err != nil {
		t.Fatal(err)
	}
	first := next(t, sub)
	eventually(t, "every event to be handed out", func() (bool, bool) {
		g, err := client.Group(ctx, group)
		if err != nil {
			t.Fatal(err)
		}
		return true, g != nil && g.GetPending() == unreadWindow && g.GetLag() == 0
	})
	if deleted, err := client.DeleteGroup(ctx, group); err != nil || !deleted {
		t.Fatalf("delete = %v, %v", deleted, err)
	}
	return sub, first
}

// ackUntilRefused acks d until an ack fails, and returns that error: acks sent before the end of the
// stream reached this side succeed.
func ackUntilRefused(d *nerve.Delivery) error {
	for {
		if err := d.Ack(); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSettleReturnsWhenTheStreamEndsWithDeliveriesUnread(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, first := endWithDeliveriesUnread(t, client, ctx, "hoarders")
	err := within(t, "an ack on the ended stream", func() error { return ackUntilRefused(first) })
	if !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("ack on a stream ended by deleting its group: %v", err)
	}
	if err := within(t, "a nack on the ended stream", func() error { return first.Nack(0) }); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("nack after the end: %v", err)
	}
	// what was received before the end is still handed out, then the stream's error
	seen := map[uint64]bool{first.Sequence(): true}
	for {
		waitCtx, cancel := context.WithTimeout(ctx, wait)
		d, err := sub.Next(waitCtx)
		cancel()
		if err != nil {
			if !errors.Is(err, nerve.ErrNotFound) {
				t.Fatalf("after %d deliveries: %v", len(seen), err)
			}
			break
		}
		if seen[d.Sequence()] {
			t.Fatalf("sequence %d delivered twice", d.Sequence())
		}
		seen[d.Sequence()] = true
	}
	if len(seen) != unreadWindow {
		t.Fatalf("%d deliveries before the end, want %d", len(seen), unreadWindow)
	}
	if err := within(t, "close", sub.Close); err != nil {
		t.Fatal(err)
	}
}

func TestCloseReturnsWhileASettleWaitsOnAnEndedStream(t *testing.T) {
	held, release := make(chan struct{}, 1), make(chan struct{})
	defer nerve.HoldSendsThatFindTheEnd(held, release)()
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	client, ctx := connect(t), testContext(t)
	sub, first := endWithDeliveriesUnread(t, client, ctx, "closers")
	acked := make(chan error, 1)
	go func() { acked <- ackUntilRefused(first) }()
	select {
	case <-held:
	case <-time.After(wait):
		t.Fatalf("no ack met the end of the stream within %s", wait)
	}
	// an ack met the end and is held before it lets the receiver know, so the receiver still waits for room
	// to queue the deliveries it read: Close must end the stream without the ack's help
	closed := within(t, "close with unread deliveries and an ack held on the ended stream", sub.Close)
	if !errors.Is(closed, nerve.ErrNotFound) {
		t.Fatalf("close: %v, want the stream's NotFound, which nothing had told", closed)
	}
	released = true
	close(release)
	// the ack goes on once Close started: it returns ErrClosed, the end being Close's to tell
	if err := within(t, "the held ack", func() error { return <-acked }); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("the held ack: %v, want ErrClosed", err)
	}
}

func TestCloseReturnsAnErrorEndNothingHadTold(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	// the server ends a member's stream (NOT_FOUND) when its group is deleted
	endedGroup := func(group string) *nerve.Subscription {
		t.Helper()
		sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{group + ".x"}, Group: group})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Close() })
		if deleted, err := client.DeleteGroup(ctx, group); err != nil || !deleted {
			t.Fatalf("delete %s = %v, %v", group, deleted, err)
		}
		select {
		case <-nerve.Ended(sub):
		case <-time.After(wait):
			t.Fatalf("the stream of %s did not end within %s of deleting its group", group, wait)
		}
		return sub
	}
	// nothing read or sent since: Close tells the end, though it came before Close
	unread := endedGroup("untold")
	if err := within(t, "close of a stream that ended unread", unread.Close); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("close of a stream that ended with NotFound, unread: %v", err)
	}
	if again := within(t, "a second close", unread.Close); !errors.Is(again, nerve.ErrNotFound) {
		t.Fatalf("second close: %v", again)
	}
	// an end that reading returned, or a send, is not told again
	read := endedGroup("told-by-next")
	if _, err := read.Next(ctx); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("next on the ended stream: %v", err)
	}
	if err := within(t, "close of a stream whose end was read", read.Close); err != nil {
		t.Fatalf("close after next returned the end: %v", err)
	}
	sent := endedGroup("told-by-send")
	if err := sent.Credit(1); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("credit on the ended stream: %v", err)
	}
	if err := within(t, "close of a stream whose end a send met", sent.Close); err != nil {
		t.Fatalf("close after a send returned the end: %v", err)
	}
}

// rounds is how often the tests of an ack sent just before the end repeat it: the ack races the end, so
// one round would rarely show a lost one.
const rounds = 50

// settledGroup opens a subscription of a new group (window 1) to eventType, publishes one event of that type
// and acks its delivery.
func settledGroup(t *testing.T, client *nerve.Client, ctx context.Context, group, eventType string) *nerve.Subscription {
	t.Helper()
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{eventType}, Group: group, MaxInFlight: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Close() })
	if _, err := client.Publish(ctx, ev(group, eventType)); err != nil {
		t.Fatal(err)
	}
	d := next(t, sub)
	if d.Event.GetId() != group || d.Attempt != 1 {
		t.Fatalf("delivery %s, attempt %d", d.Event.GetId(), d.Attempt)
	}
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	return sub
}

func TestCloseKeepsTheAcksSentBeforeIt(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	unsettled := 0
	for i := range rounds {
		group := fmt.Sprintf("graceful-%d", i)
		sub := settledGroup(t, client, ctx, group, fmt.Sprintf("graceful.%d", i))
		if err := within(t, "close", sub.Close); err != nil {
			t.Fatal(err)
		}
		// no waiting: the server ends the stream only after it saved the ack and let go of the member
		g, err := client.Group(ctx, group)
		if err != nil {
			t.Fatal(err)
		}
		if g.GetPending() != 0 || g.GetConsumers() != 0 {
			unsettled++
		}
	}
	if unsettled > 0 {
		t.Fatalf("%d of %d groups still held their acked event, or their member, when Close returned", unsettled, rounds)
	}
}

func TestAcksSentBeforeACancelCount(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	lost := 0
	for i := range rounds {
		group := fmt.Sprintf("cancelled-%d", i)
		subCtx, cancel := context.WithCancel(ctx)
		settledGroup(t, client, subCtx, group, fmt.Sprintf("cancelled.%d", i))
		cancel() // no Close message: the call ends with the ack just sent
		// nothing answers a cancel: the member is gone once the server has handled the end
		g := eventually(t, "the cancelled member to leave", func() (*nervepb.GroupInfo, bool) {
			g, err := client.Group(ctx, group)
			if err != nil {
				t.Fatal(err)
			}
			return g, g.GetConsumers() == 0
		})
		if g.GetPending() != 0 {
			lost++
		}
	}
	if lost > 0 {
		t.Fatalf("%d of %d acks sent before a cancel were lost", lost, rounds)
	}
}

func TestCloseDropsWhatArrivesWhileItWaits(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	// more unread than the client and its transport take in, so the server waits on flow control, and
	// reads the Close message only once the client reads on
	const events, size = unreadWindow, 64 << 10
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"flood.x"}, Group: "flooded", MaxInFlight: events})
	if err != nil {
		t.Fatal(err)
	}
	for i := range events / 8 {
		batch := make([]*nervepb.Event, 8)
		for j := range batch {
			id := fmt.Sprintf("f%d", i*8+j)
			batch[j] = nerve.NewEvent("//tests", "flood.x").ID(id).Text(strings.Repeat("x", size)).MustBuild()
		}
		if _, err := client.Publish(ctx, batch...); err != nil {
			t.Fatal(err)
		}
	}
	d := next(t, sub)
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := within(t, "close with deliveries unread", sub.Close); err != nil {
		t.Fatalf("close after %s: %v", time.Since(start), err)
	}
	g, err := client.Group(ctx, "flooded")
	if err != nil {
		t.Fatal(err)
	}
	// everything but the acked one is back in the group
	if g.GetPending()+g.GetLag() != events-1 || g.GetConsumers() != 0 {
		t.Fatalf("after close: pending %d, lag %d, consumers %d", g.GetPending(), g.GetLag(), g.GetConsumers())
	}
}

// Subscribe confirms the subscription, then neither reads nor ends the stream: a server that never
// answers a Close.
func (fakeBus) Subscribe(stream grpc.BidiStreamingServer[nervepb.SubscribeRequest, nervepb.SubscribeResponse]) error {
	if _, err := stream.Recv(); err != nil {
		return err
	}
	subscribed := &nervepb.SubscribeResponse_Subscribed{Subscribed: &nervepb.Subscribed{SubscriptionId: "silent"}}
	if err := stream.Send(&nervepb.SubscribeResponse{Message: subscribed}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return stream.Context().Err()
}

func TestCloseGivesUpOnAServerThatNeverEndsTheStream(t *testing.T) {
	defer func(was time.Duration) { *nerve.CloseWait = was }(*nerve.CloseWait)
	*nerve.CloseWait = 300 * time.Millisecond // instead of the real bound of seconds
	client, ctx := connectFake(t, fakeBus{}), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"silent.x"}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = within(t, "close on a server that never ends the stream", sub.Close)
	if took := time.Since(start); !errors.Is(err, nerve.ErrDeadlineExceeded) || took < *nerve.CloseWait {
		t.Fatalf("close returned %v after %s", err, took)
	}
	if again := within(t, "a second close", sub.Close); again != err {
		t.Fatalf("second close: %v, first: %v", again, err)
	}
	if _, err := sub.Next(ctx); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("next after close: %v", err)
	}
}

func TestSubscriptionStateIsSafeToReadWhileNextRuns(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	if _, err := client.Publish(ctx, ev("s1", "state.x")); err != nil {
		t.Fatal(err)
	}
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"state.x"}, Start: nerve.StartEarliest(), HeartbeatInterval: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // another goroutine watching progress, as the README allows
		for {
			select {
			case <-stop:
				return
			default:
			}
			_, _ = sub.CaughtUp()
			_ = sub.Heartbeats()
			_ = sub.LastHeartbeat().GetInFlight()
			time.Sleep(time.Millisecond)
		}
	})
	history, err := sub.UntilCaughtUp(ctx)
	if err != nil || len(history) != 1 {
		t.Fatalf("history = %d, %v", len(history), err)
	}
	expectIdle(t, sub, 3)
	close(stop)
	wg.Wait()
	if _, ok := sub.CaughtUp(); !ok || sub.Heartbeats() < 3 || sub.LastHeartbeat() == nil {
		t.Fatalf("caught up %v, %d heartbeats, last %v", ok, sub.Heartbeats(), sub.LastHeartbeat())
	}
}

func TestHeartbeatTimeoutIgnoresAnApplicationThatDoesNotRead(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"slow.x"}, HeartbeatInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	// an application busy elsewhere: the heartbeats fill what the subscription buffers, well before this
	// is over, and it then stops reading the network for longer than the timeout (300ms)
	time.Sleep(3 * time.Second)
	expectIdle(t, sub, 40) // what was buffered, then live ones: the stream is still open
}

func TestBadSettleArgumentsAreRefusedWithoutEndingTheStream(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"args.x"}, Group: "checkers", HeartbeatInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, err := client.Publish(ctx, ev("a1", "args.x")); err != nil {
		t.Fatal(err)
	}
	d := next(t, sub)
	for name, bad := range map[string]struct {
		field string
		call  func() error
	}{
		"negative nack delay": {"nack.retry_delay", func() error { return d.Nack(-time.Second) }},
		"zero extension":      {"extend.extension", func() error { return d.Extend(0) }},
		"negative extension":  {"extend.extension", func() error { return sub.Extend(-time.Second, d) }},
	} {
		err := bad.call()
		var e *nerve.Error
		if !errors.As(err, &e) || !errors.Is(err, nerve.ErrInvalidArgument) {
			t.Fatalf("%s: want InvalidArgument, got %v", name, err)
		}
		if _, ok := e.Violation(bad.field); !ok {
			t.Fatalf("%s: violations %v", name, e.FieldViolations)
		}
	}
	// nothing was sent: the stream and its delivery are still there
	if err := d.Extend(time.Second); err != nil {
		t.Fatal(err)
	}
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	if beat := expectIdle(t, sub, 2); beat.GetInFlight() != 0 {
		t.Fatalf("in flight after the ack: %d", beat.GetInFlight())
	}
}

// recordingBus confirms a subscription, then passes each request it reads after the opening to sent, in
// order; like the real server, it ends the stream with OK on a Close message or the client's half-close.
type recordingBus struct {
	nervepb.UnimplementedEventBusServer
	sent chan *nervepb.SubscribeRequest
}

func (b recordingBus) Subscribe(stream grpc.BidiStreamingServer[nervepb.SubscribeRequest, nervepb.SubscribeResponse]) error {
	if _, err := stream.Recv(); err != nil {
		return err
	}
	subscribed := &nervepb.SubscribeResponse_Subscribed{Subscribed: &nervepb.Subscribed{SubscriptionId: "recorded"}}
	if err := stream.Send(&nervepb.SubscribeResponse{Message: subscribed}); err != nil {
		return err
	}
	for {
		req, err := stream.Recv()
		if err != nil {
			return nil
		}
		b.sent <- req
		if req.GetClose() != nil {
			return nil
		}
	}
}

// received returns the next request bus read, failing the test if none comes within wait.
func (b recordingBus) received(t *testing.T, what string) *nervepb.SubscribeRequest {
	t.Helper()
	select {
	case req := <-b.sent:
		return req
	case <-time.After(wait):
		t.Fatalf("the server read no %s within %s", what, wait)
		return nil
	}
}

func TestSettlingNoDeliverySendsNothing(t *testing.T) {
	bus := recordingBus{sent: make(chan *nervepb.SubscribeRequest, 64)}
	client, ctx := connectServing(t, func(s *grpc.Server) { nervepb.RegisterEventBusServer(s, bus) }), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"empty.x"}, Group: "empties"})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	var none []*nerve.Delivery // an empty history, as UntilCaughtUp returns when there was none
	empty := map[string]func() error{
		"ack":           func() error { return sub.Ack() },
		"ack of none":   func() error { return sub.Ack(none...) },
		"ack ids":       func() error { return sub.AckIDs() },
		"nack":          func() error { return sub.Nack(0) },
		"delayed nack":  func() error { return sub.Nack(time.Second, none...) },
		"dead letter":   func() error { return sub.DeadLetter("bad input: \xff") },
		"extend":        func() error { return sub.Extend(time.Second) },
		"extend (none)": func() error { return sub.Extend(time.Minute, none...) },
	}
	// argument checks come first: a bad call is refused the same with or without deliveries
	invalid := map[string]struct {
		field string
		call  func() error
	}{
		"negative nack delay": {"nack.retry_delay", func() error { return sub.Nack(-time.Second) }},
		"zero extension":      {"extend.extension", func() error { return sub.Extend(0) }},
		"negative extension":  {"extend.extension", func() error { return sub.Extend(-time.Second, none...) }},
	}
	check := func(when string) {
		t.Helper()
		for name, call := range empty {
			if err := call(); err != nil {
				t.Fatalf("%s of no delivery %s: %v", name, when, err)
			}
		}
		for _, bad := range invalid {
			wantViolation(t, bad.call(), bad.field)
		}
	}
	check("on an open stream")
	// a settlement that names a delivery is sent, and is the first thing the server reads: nothing went before
	if err := sub.AckIDs("named"); err != nil {
		t.Fatal(err)
	}
	if req := bus.received(t, "ack"); !slices.Equal(req.GetAck().GetDeliveryIds(), []string{"named"}) {
		t.Fatalf("the server read %v first, want the ack of \"named\"", req)
	}
	// once closed, settling no delivery still returns nil (it sends nothing), where settling one is refused
	if err := within(t, "close", sub.Close); err != nil {
		t.Fatal(err)
	}
	check("after Close")
	if req := bus.received(t, "close"); req.GetClose() == nil {
		t.Fatalf("the server read %v, want the Close message", req)
	}
	if err := sub.Ack(&nerve.Delivery{DeliveryID: "late"}); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("ack of a delivery after Close: %v, want ErrClosed", err)
	}

	// half-closed: settling no delivery returns nil too, where settling one returns ErrClosed
	sub, err = client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"empty.x"}, Group: "empties"})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.CloseSend(); err != nil {
		t.Fatal(err)
	}
	check("after CloseSend")
	if err := sub.Nack(0, &nerve.Delivery{DeliveryID: "late"}); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("nack of a delivery after CloseSend: %v, want ErrClosed", err)
	}
	// the server ends the stream once it read the half-close: by then it read whatever was sent before it
	select {
	case <-nerve.Ended(sub):
	case <-time.After(wait):
		t.Fatalf("the server did not end the half-closed stream within %s", wait)
	}
	select {
	case req := <-bus.sent:
		t.Fatalf("the server read %v from a stream that sent nothing before its half-close", req)
	default:
	}
}

// wantViolation fails the test unless err is an InvalidArgument *nerve.Error naming field.
func wantViolation(t *testing.T, err error, field string) *nerve.Error {
	t.Helper()
	var e *nerve.Error
	if !errors.As(err, &e) || !errors.Is(err, nerve.ErrInvalidArgument) {
		t.Fatalf("%s: want InvalidArgument, got %v", field, err)
	}
	if _, ok := e.Violation(field); !ok {
		t.Fatalf("%s: violations %v", field, e.FieldViolations)
	}
	return e
}

func TestStringsThatAreNotUTF8DoNotEndTheStream(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	// protobuf cannot encode them: sent, they would end the whole stream
	_, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"utf8.\xff"}})
	wantViolation(t, err, "open.types[0]")
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"utf8.x"}, Group: "menders", MaxInFlight: 2, HeartbeatInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, err := client.Publish(ctx, ev("u1", "utf8.x"), ev("u2", "utf8.x")); err != nil {
		t.Fatal(err)
	}
	dead, kept := next(t, sub), next(t, sub)
	// a reason is mended rather than refused, as the server takes any
	if err := dead.DeadLetter("bad input: \xff"); err != nil {
		t.Fatalf("dead letter with a reason that is not UTF-8: %v", err)
	}
	wantViolation(t, sub.SetFilter(nerve.Exact(map[string]string{"subject": "eu-\xff"})), `set_filter.filter.exact.attributes["subject"]`)
	wantViolation(t, sub.AckIDs("\xff"), "ack.delivery_ids[0]")
	// the stream went on: the other delivery is still in flight, and settles
	if err := kept.Ack(); err != nil {
		t.Fatal(err)
	}
	if beat := expectIdle(t, sub, 2); beat.GetInFlight() != 0 {
		t.Fatalf("in flight after the ack: %d", beat.GetInFlight())
	}
	var letters []*nervepb.DeadLetter
	for letter, err := range client.DeadLetters(ctx, "menders", 0) {
		if err != nil {
			t.Fatal(err)
		}
		letters = append(letters, letter)
	}
	if len(letters) != 1 || letters[0].GetEvent().GetId() != dead.Event.GetId() || letters[0].GetReason() != "bad input: \uFFFD" {
		t.Fatalf("dead letters: %v", letters)
	}
}

// A private stream: a group member's stream ends when it half-closes (it could settle nothing more).
func TestSettlingAfterCloseSendIsRefusedAndDeliveriesGoOn(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"half.x"}, MaxInFlight: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, err := client.Publish(ctx, ev("h1", "half.x")); err != nil {
		t.Fatal(err)
	}
	d := next(t, sub)
	if err := sub.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"ack":         d.Ack,
		"nack":        func() error { return d.Nack(0) },
		"dead letter": func() error { return d.DeadLetter("late") },
		"extend":      func() error { return d.Extend(time.Second) },
		"credit":      func() error { return sub.Credit(1) },
		"set filter":  func() error { return sub.SetFilter(nil) },
	} {
		if err := call(); !errors.Is(err, nerve.ErrClosed) {
			t.Fatalf("%s after CloseSend: want ErrClosed, got %v", name, err)
		}
	}
	// nothing was sent: the stream goes on, deliveries keep coming
	if _, err := client.Publish(ctx, ev("h2", "half.x")); err != nil {
		t.Fatal(err)
	}
	if later := next(t, sub); later.Event.GetId() != "h2" || later.Attempt != 1 {
		t.Fatalf("after CloseSend: delivery %s, attempt %d", later.Event.GetId(), later.Attempt)
	}
	if err := within(t, "close after CloseSend", sub.Close); err != nil {
		t.Fatal(err)
	}
}

func TestNextTakesWhatIsQueuedBeforeAnEndedContext(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	ended, cancel := context.WithCancel(ctx)
	cancel()
	// queued deliveries, with the caught-up marker, fit in what a Subscription buffers (16 messages), so
	// that its receiver reads the end of the stream after them without anyone reading
	const rounds, queued = 4, 14
	for r := range rounds {
		group := fmt.Sprintf("queued-%d", r)
		events := make([]*nervepb.Event, queued)
		for i := range events {
			events[i] = ev(fmt.Sprintf("%s-%d", group, i), group+".x")
		}
		if _, err := client.Publish(ctx, events...); err != nil {
			t.Fatal(err)
		}
		sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{group + ".x"}, Group: group, Start: nerve.StartEarliest()})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "every event to be handed out", func() (bool, bool) {
			g, err := client.Group(ctx, group)
			if err != nil {
				t.Fatal(err)
			}
			return true, g != nil && g.GetPending() == queued && g.GetLag() == 0
		})
		// the server ends a group member's stream that half-closes, after what it sent before
		if err := sub.CloseSend(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-nerve.Ended(sub):
		case <-time.After(wait):
			t.Fatalf("round %d: the half-closed member's stream did not end within %s", r, wait)
		}
		// everything received is queued now, and comes before the ended context. A select among the
		// queue, the end and the context would take the context with probability 1/3 while deliveries are
		// queued and 1/2 at the end: all 4 rounds would pass by luck with ((2/3)^14 * 1/2)^4, below 1e-11
		seen := map[string]bool{}
		for i := range queued {
			d, err := sub.Next(ended)
			if err != nil {
				t.Fatalf("round %d: next with an ended context, after %d of %d queued deliveries: %v", r, i, queued, err)
			}
			seen[d.Event.GetId()] = true
		}
		if len(seen) != queued {
			t.Fatalf("round %d: %d distinct deliveries, want %d", r, len(seen), queued)
		}
		if _, err := sub.Next(ended); !errors.Is(err, nerve.ErrFailedPrecondition) {
			t.Fatalf("round %d: next with an ended context, once the queue is empty: %v, want the stream's end", r, err)
		}
		if err := within(t, "close", sub.Close); err != nil {
			t.Fatalf("round %d: close after next returned the end: %v", r, err)
		}
	}
}

func TestNextReturnsItsContextsErrorAsAnError(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	// a window of one with a second event stored: once the first delivery is read, nothing more comes (not
	// even the caught-up marker) but heartbeats
	if _, err := client.Publish(ctx, ev("w1", "waiting.x"), ev("w2", "waiting.x")); err != nil {
		t.Fatal(err)
	}
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"waiting.x"}, Group: "waiters", Start: nerve.StartEarliest(), MaxInFlight: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	d := next(t, sub)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	expired, cancelExpired := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancelExpired()
	for name, call := range map[string]func() error{
		"next":            func() error { _, err := sub.Next(cancelled); return err },
		"next message":    func() error { _, err := sub.NextMessage(cancelled); return err },
		"until caught up": func() error { _, err := sub.UntilCaughtUp(cancelled); return err },
	} {
		err := call()
		var e *nerve.Error
		if !errors.As(err, &e) || !errors.Is(err, context.Canceled) || nerve.Code(err) != codes.Canceled ||
			status.Code(err) != codes.Canceled {
			t.Fatalf("%s with a cancelled context: %v, want an *nerve.Error with code Canceled", name, err)
		}
	}
	for name, call := range map[string]func() error{
		"next":            func() error { _, err := sub.Next(expired); return err },
		"until caught up": func() error { _, err := sub.UntilCaughtUp(expired); return err },
	} {
		err := call()
		var e *nerve.Error
		if !errors.As(err, &e) || !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, nerve.ErrDeadlineExceeded) ||
			status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%s with an expired context: %v, want an *nerve.Error with code DeadlineExceeded", name, err)
		}
	}
	// the stream is still usable
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	if d := next(t, sub); d.Event.GetId() != "w2" {
		t.Fatalf("after the calls that gave up: delivery %s, want w2", d.Event.GetId())
	}
}
