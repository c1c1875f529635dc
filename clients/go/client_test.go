package nerve_test

// The client layer beyond the shared scenarios: event building, dead letters and admin, errors, closing.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

func TestEventBuilderBuildsCloudEvents(t *testing.T) {
	when := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	e, err := nerve.NewEvent("//billing", "invoice.paid.v1").
		JSON(map[string]any{"amount": 12, "currency": "EUR"}).
		Subject("invoice-7").
		Priority(nerve.PriorityHigh).
		CorrelationID("order-7").
		Time(when).
		Extension("tenant", "acme").
		Extension("retries", 3).
		Extension("urgent", true).
		Extension("due", when).
		Build()
	if err != nil {
		t.Fatal(err)
	}
	if e.GetSpecVersion() != "1.0" || e.GetId() == "" || e.GetPriority() != nervepb.Priority_PRIORITY_HIGH {
		t.Fatalf("event = %v", e)
	}
	if e.GetDataContentType() != "application/json" || !e.GetTime().AsTime().Equal(when) {
		t.Fatalf("event = %v", e)
	}
	var data struct {
		Amount   int
		Currency string
	}
	if err := nerve.UnmarshalData(e, &data); err != nil || data.Amount != 12 || data.Currency != "EUR" {
		t.Fatalf("data = %+v, %v", data, err)
	}
	want := map[string]any{"tenant": "acme", "retries": int32(3), "urgent": true, "due": when}
	if got := nerve.Extensions(e); !maps.EqualFunc(got, want, func(a, b any) bool {
		if ta, ok := a.(time.Time); ok {
			return ta.Equal(b.(time.Time))
		}
		return a == b
	}) {
		t.Fatalf("extensions = %v", got)
	}
	packed := nerve.NewEvent("//s", "t").Proto(durationpb.New(5 * time.Second)).MustBuild()
	var d durationpb.Duration
	if err := packed.GetProtoData().UnmarshalTo(&d); err != nil || d.AsDuration() != 5*time.Second {
		t.Fatalf("proto data = %v, %v", packed.GetProtoData(), err)
	}
	if _, err := nerve.NewEvent("//s", "t").Extension("big", int64(1)<<31).Build(); err == nil {
		t.Fatal("an extension integer beyond 32 bits is an error")
	}
	a, b := nerve.NewEvent("//s", "t").MustBuild(), nerve.NewEvent("//s", "t").MustBuild()
	if a.GetId() == b.GetId() {
		t.Fatal("default ids are unique")
	}
	before := time.Now().UnixMilli()
	id := nerve.NewEvent("//s", "t").MustBuild().GetId()
	after := time.Now().UnixMilli()
	digits := strings.ReplaceAll(id, "-", "")
	ms, err := strconv.ParseInt(digits[:12], 16, 64)
	if err != nil || len(id) != 36 || digits[12] != '7' || !strings.ContainsRune("89ab", rune(digits[16])) ||
		ms < before || ms > after {
		t.Fatalf("default id %q is not a UUIDv7 of the time it was built (%d..%d ms)", id, before, after)
	}
}

func TestDeadLettersAndAdmin(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"park.*"}, Group: "parkers", HeartbeatInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	stored, err := client.Publish(ctx, ev("k1", "park.x"), ev("k2", "park.y"))
	if err != nil {
		t.Fatal(err)
	}
	first, second := next(t, sub), next(t, sub)
	poison, fine := first, second
	if first.Event.GetId() != "k1" {
		poison, fine = second, first
	}
	if poison.Event.GetId() != "k1" || fine.Event.GetId() != "k2" {
		t.Fatalf("deliveries %s, %s", first.Event.GetId(), second.Event.GetId())
	}
	if err := poison.DeadLetter("schema mismatch"); err != nil {
		t.Fatal(err)
	}
	if err := fine.Ack(); err != nil {
		t.Fatal(err)
	}
	if beat := expectIdle(t, sub, 1); beat.GetInFlight() != 0 {
		t.Fatalf("in flight %d", beat.GetInFlight())
	}
	letters := eventually(t, "the dead letter", func() ([]*nervepb.DeadLetter, bool) {
		var out []*nervepb.DeadLetter
		for d, err := range client.DeadLetters(ctx, "parkers", 0) {
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, d)
		}
		return out, len(out) > 0
	})
	if len(letters) != 1 || letters[0].GetReason() != "schema mismatch" || letters[0].GetEvent().GetSequence() != stored[0].GetSequence() {
		t.Fatalf("dead letters = %v", letters)
	}
	if n, err := client.RedriveAllDeadLetters(ctx, "parkers"); err != nil || n != 1 {
		t.Fatalf("redrive = %d, %v", n, err)
	}
	back := next(t, sub)
	if back.Event.GetId() != "k1" {
		t.Fatalf("redriven = %s", back.Event.GetId())
	}
	if err := back.Ack(); err != nil {
		t.Fatal(err)
	}
	sub.Close()

	types, err := client.ListEventTypes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, ti := range types {
		counts[ti.GetType()] = ti.GetCount()
	}
	if !maps.Equal(counts, map[string]uint64{"park.x": 1, "park.y": 1}) {
		t.Fatalf("types = %v", counts)
	}
	if deleted, err := client.DeleteGroup(ctx, "parkers"); err != nil || !deleted {
		t.Fatalf("delete = %v, %v", deleted, err)
	}
	if g, err := client.Group(ctx, "parkers"); err != nil || g != nil {
		t.Fatalf("group after delete = %v, %v", g, err)
	}
	if _, err := client.GetEvent(ctx, "missing", ""); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("missing event: %v", err)
	}
}

func TestAdminListsReadEveryPage(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	// more than one page of each (the server's default page is 100)
	var types []string
	var events []*nervepb.Event
	for i := range 150 {
		types = append(types, fmt.Sprintf("paged.t%03d", i))
		events = append(events, ev(fmt.Sprintf("p%d", i), types[i]))
	}
	if _, err := client.Publish(ctx, events...); err != nil {
		t.Fatal(err)
	}
	listed, err := client.ListEventTypes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, ti := range listed {
		got = append(got, ti.GetType())
	}
	if !slices.Equal(got, types) {
		t.Fatalf("types = %v", got)
	}
	var groups []string
	for i := range 101 {
		groups = append(groups, fmt.Sprintf("paged-%03d", i))
		sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"paged.t000"}, Group: groups[i]})
		if err != nil {
			t.Fatal(err)
		}
		sub.Close()
	}
	infos, err := client.ListGroups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, g := range infos {
		got = append(got, g.GetName())
	}
	if !slices.Equal(got, groups) {
		t.Fatalf("groups = %v", got)
	}
	if g, err := client.Group(ctx, "paged-100"); err != nil || g.GetName() != "paged-100" {
		t.Fatalf("group on the second page = %v, %v", g, err)
	}
}

func TestFilterAndBadOpen(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	_, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"a.b"}, Group: "g", AckDeadline: time.Millisecond})
	var e *nerve.Error
	if !errors.As(err, &e) || !errors.Is(err, nerve.ErrInvalidArgument) {
		t.Fatalf("want InvalidArgument, got %v", err)
	}
	if _, ok := e.Violation("open.ack_deadline"); !ok {
		t.Fatalf("violations %v", e.FieldViolations)
	}
	// a start past the last stored sequence (a position kept from a store since wiped)
	if _, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"a.b"}, Start: nerve.StartAfter(1 << 40)}); !errors.Is(err, nerve.ErrOutOfRange) {
		t.Fatalf("want OutOfRange, got %v", err)
	}

	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types: []string{"filter.x"}, Filter: nerve.Exact(map[string]string{"subject": "keep"}), Start: nerve.StartEarliest(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	kept := ev("keep-me", "filter.x")
	kept.Subject = "keep"
	if _, err := client.Publish(ctx, ev("drop-me", "filter.x"), kept); err != nil {
		t.Fatal(err)
	}
	if d := next(t, sub); d.Event.GetId() != "keep-me" {
		t.Fatalf("filtered delivery = %s", d.Event.GetId())
	}
}

func TestClosedSubscriptionEnds(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"closing.x"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Next(context.Background()); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("next after close: %v", err)
	}
	if err := sub.AckIDs("1-1"); !errors.Is(err, nerve.ErrClosed) {
		t.Fatalf("ack after close: %v", err)
	}
}

func TestNextGivesUpWithItsContextAndTheStreamStaysUsable(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"patience.x"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	short, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := sub.Next(short); !errors.Is(err, context.Canceled) {
		t.Fatalf("next with a cancelled context: %v", err)
	}
	if _, err := client.Publish(ctx, ev("p1", "patience.x")); err != nil {
		t.Fatal(err)
	}
	if d := next(t, sub); d.Event.GetId() != "p1" {
		t.Fatalf("delivery = %s", d.Event.GetId())
	}
}

func TestRequestWithoutTimeoutLeavesTheWaitToTheServer(t *testing.T) {
	// a short server default, so that its answer comes at once; a client that guessed a default of its own
	// would send that as the call's deadline, cutting short a server default longer than the guess
	addr := startServer(t, "NERVE_BUS__DEFAULT_REQUEST_TIMEOUT=300ms")
	sent := make(chan time.Duration, 1) // the deadline each Request call went out with; -1: none
	record := grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if method == nervepb.EventBus_Request_FullMethodName {
			left := time.Duration(-1)
			if deadline, ok := ctx.Deadline(); ok {
				left = time.Until(deadline)
			}
			sent <- left
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
	client, err := nerve.Dial(addr, record)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// no deadline: only what Request itself sets bounds the call (the select below bounds the test)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	silent, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"silent.requested"}})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	ask := func(timeout time.Duration) error {
		t.Helper()
		done := make(chan error, 1)
		go func() {
			_, err := client.Request(ctx, ev("q-"+timeout.String(), "silent.requested"), timeout)
			done <- err
		}()
		select {
		case err := <-done:
			return err
		case <-time.After(wait):
			t.Fatalf("the request with timeout %s got no answer", timeout)
			return nil
		}
	}
	// the server's own timeout answers, with its message, and the call carried no deadline
	err = ask(0)
	var e *nerve.Error
	if !errors.As(err, &e) || e.Code != codes.DeadlineExceeded || !strings.Contains(e.Message, "within 300ms") {
		t.Fatalf("want the server's DeadlineExceeded after its default of 300ms, got %v", err)
	}
	if left := <-sent; left != -1 {
		t.Fatalf("a request without timeout went out with a deadline %s away; the server's default decides", left)
	}
	// with a timeout, the call's deadline is a grace beyond it, so the server still answers first
	err = ask(200 * time.Millisecond)
	if !errors.As(err, &e) || e.Code != codes.DeadlineExceeded || !strings.Contains(e.Message, "within 200ms") {
		t.Fatalf("want the server's DeadlineExceeded after 200ms, got %v", err)
	}
	if left := <-sent; left < time.Second || left > 200*time.Millisecond+5*time.Second {
		t.Fatalf("a request with a 200ms timeout went out with a deadline %s away", left)
	}
}

func TestRequestRefusesANegativeTimeout(t *testing.T) {
	// a short server default: sent as no timeout at all, the request would wait that long for a reply
	client, ctx := connect(t, "NERVE_BUS__DEFAULT_REQUEST_TIMEOUT=300ms"), testContext(t)
	responder, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"negative.requested"}})
	if err != nil {
		t.Fatal(err)
	}
	defer responder.Close()
	_, err = client.Request(ctx, ev("negative", "negative.requested"), -time.Second)
	wantViolation(t, err, "timeout")
	// nothing was sent: the server stores every request a subscriber could receive
	if _, err := client.GetEvent(ctx, "negative", "//tests"); !errors.Is(err, nerve.ErrNotFound) {
		t.Fatalf("the refused request was stored: want NotFound, got %v", err)
	}
}

func TestArgumentsRefusedBeforeSendingAreInvalidArgument(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	pub := openPublisher(t, client, ctx)
	for field, call := range map[string]func() error{
		"reply_to": func() error { _, err := client.Reply(ctx, "", ev("not-a-request", "args.x")); return err },
		"events":   func() error { _, err := client.Publish(ctx); return err },
	} {
		wantViolation(t, call(), field)
	}
	_, err := pub.Publish(ctx)
	wantViolation(t, err, "events")
	// the server refuses both the same way: the client only saves the round trip
	if _, err := client.EventBusStub().Publish(ctx, &nervepb.PublishRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("the server's answer to a publish without events: %v", err)
	}
	if _, err := client.EventBusStub().Reply(ctx, &nervepb.ReplyRequest{Event: ev("not-a-request", "args.x")}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("the server's answer to a reply without reply_to: %v", err)
	}
	// nothing ended the stream
	if _, err := pub.Publish(ctx, ev("after", "args.x")); err != nil {
		t.Fatalf("publish after the refusal: %v", err)
	}
}

func TestReplayReceivesAPageOverGRPCsDefaultLimit(t *testing.T) {
	addr := startServer(t)
	client, err := nerve.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := testContext(t)
	// 1000 events of 4,190 bytes as the server counts them (id, source, type, spec version and data): one
	// page, bounded by the default max_batch_bytes of 4 MiB, holds them all, and with the fields the
	// server does not count (sequence, recorded time) and the protobuf framing it is over 4 MiB
	const events, size = 1000, 4190
	for batch := range 4 {
		evs := make([]*nervepb.Event, events/4)
		for i := range evs {
			id := fmt.Sprintf("big-%04d", batch*len(evs)+i)
			data := strings.Repeat("x", size-len(id)-len("//tests")-len("big.v1")-len("1.0"))
			evs[i] = nerve.NewEvent("//tests", "big.v1").ID(id).Text(data).MustBuild()
		}
		if _, err := client.Publish(ctx, evs...); err != nil {
			t.Fatal(err)
		}
	}
	opts := nerve.ReplayOptions{Types: []string{"big.v1"}, PageSize: events}
	page, err := client.Replay(ctx, opts).NextPage()
	if err != nil {
		t.Fatalf("replay of a page over 4 MiB: %v", err)
	}
	if len(page.GetEvents()) != events || proto.Size(page) <= 4<<20 {
		t.Fatalf("page of %d events, %d bytes: want all %d in one page over 4 MiB", len(page.GetEvents()), proto.Size(page), events)
	}
	// grpc-go's default limit refuses that page; a limit given to Dial overrides the client's own
	limited, err := nerve.Dial(addr, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(4<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer limited.Close()
	if _, err := limited.Replay(ctx, opts).NextPage(); nerve.Code(err) != codes.ResourceExhausted {
		t.Fatalf("with a 4 MiB receive limit: want ResourceExhausted, got %v", err)
	}
}

// olderAdmin is an Admin server from before GetGroup: it lists groups, one per page.
type olderAdmin struct {
	nervepb.UnimplementedAdminServer
	names []string
}

func (a *olderAdmin) ListGroups(_ context.Context, req *nervepb.ListGroupsRequest) (*nervepb.ListGroupsResponse, error) {
	i := 0
	if req.GetPageToken() != "" {
		i = slices.Index(a.names, req.GetPageToken()) + 1
	}
	if i >= len(a.names) {
		return &nervepb.ListGroupsResponse{}, nil
	}
	resp := &nervepb.ListGroupsResponse{Groups: []*nervepb.GroupInfo{{Name: a.names[i]}}}
	if i+1 < len(a.names) {
		resp.NextPageToken = a.names[i]
	}
	return resp, nil
}

func TestGroupFallsBackToTheListOnAServerWithoutGetGroup(t *testing.T) {
	client := connectServing(t, func(s *grpc.Server) {
		nervepb.RegisterAdminServer(s, &olderAdmin{names: []string{"first", "second"}})
	})
	ctx := context.Background()
	if g, err := client.Group(ctx, "second"); err != nil || g.GetName() != "second" {
		t.Fatalf("group on the second page = %v, %v", g, err)
	}
	if g, err := client.Group(ctx, "third"); err != nil || g != nil {
		t.Fatalf("missing group = %v, %v; want nil, nil", g, err)
	}
}

// brokenReplay sends its one page of two events, then breaks the stream with Unavailable instead of ending
// it with OK, as a connection lost right after the last page does; it counts the calls.
type brokenReplay struct {
	nervepb.UnimplementedEventBusServer
	endOfHistory bool
	calls        atomic.Int32
}

func (b *brokenReplay) Replay(req *nervepb.ReplayRequest, stream grpc.ServerStreamingServer[nervepb.ReplayResponse]) error {
	b.calls.Add(1)
	page := &nervepb.ReplayResponse{
		Events:       []*nervepb.Event{ev("r1", "history.v1"), ev("r2", "history.v1")},
		ResumeToken:  "after-r2",
		EndOfHistory: b.endOfHistory,
	}
	if err := stream.Send(page); err != nil {
		return err
	}
	return status.Error(codes.Unavailable, "connection lost after the last page")
}

func TestAReplayThatBreaksAfterItsLastPageEndsCleanly(t *testing.T) {
	for _, c := range []struct {
		name string
		bus  *brokenReplay
		opts nerve.ReplayOptions
	}{
		{"at the end of history", &brokenReplay{endOfHistory: true}, nerve.ReplayOptions{}},
		{"at its limit", &brokenReplay{}, nerve.ReplayOptions{Limit: 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			bus := c.bus
			client := connectServing(t, func(s *grpc.Server) { nervepb.RegisterEventBusServer(s, bus) })
			replay := client.Replay(testContext(t), c.opts)
			var ids []string
			for e, err := range replay.All() {
				if err != nil {
					t.Fatalf("after %v: %v; the replay had everything it asked for", ids, err)
				}
				ids = append(ids, e.GetId())
			}
			if !slices.Equal(ids, []string{"r1", "r2"}) || bus.calls.Load() != 1 {
				t.Fatalf("events %v in %d calls, want [r1 r2] in one call", ids, bus.calls.Load())
			}
		})
	}
}

func TestAdminCallsAndReplayRefuseAStringThatIsNotUTF8(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	if _, err := client.Publish(ctx, ev("kept", "utf8.x")); err != nil {
		t.Fatal(err)
	}
	replay := func(opts nerve.ReplayOptions) error {
		_, err := client.Replay(ctx, opts).Next()
		return err
	}
	// protobuf cannot encode them: sent, grpc-go would fail each call with INTERNAL, naming no field
	for _, c := range []struct {
		name, field string
		call        func() error
	}{
		{"GetEvent", "id", func() error { _, err := client.GetEvent(ctx, "kept\xff", ""); return err }},
		{"GetEvent", "source", func() error { _, err := client.GetEvent(ctx, "kept", "//tests\xff"); return err }},
		{"Group", "group", func() error { _, err := client.Group(ctx, "g\xff"); return err }},
		{"DeleteGroup", "group", func() error { _, err := client.DeleteGroup(ctx, "g\xff"); return err }},
		{"DeadLetters", "group", func() error {
			for _, err := range client.DeadLetters(ctx, "g\xff", 0) {
				return err
			}
			return nil
		}},
		{"RedriveDeadLetters", "group", func() error { _, err := client.RedriveDeadLetters(ctx, "g\xff", 1); return err }},
		{"RedriveAllDeadLetters", "group", func() error { _, err := client.RedriveAllDeadLetters(ctx, "g\xff"); return err }},
		{"Replay", "types[1]", func() error { return replay(nerve.ReplayOptions{Types: []string{"utf8.x", "utf8.\xff"}}) }},
		{"Replay", "resume_token", func() error { return replay(nerve.ReplayOptions{ResumeToken: "\xff"}) }},
	} {
		t.Run(c.name+" "+c.field, func(t *testing.T) { wantViolation(t, c.call(), c.field) })
	}
	// the connection goes on: valid calls succeed
	if got, err := client.GetEvent(ctx, "kept", "//tests"); err != nil || got.GetId() != "kept" {
		t.Fatalf("get event after the refusals: %v, %v", got, err)
	}
	if g, err := client.Group(ctx, "nobody"); err != nil || g != nil {
		t.Fatalf("group after the refusals: %v, %v", g, err)
	}
	if got, err := client.Replay(ctx, nerve.ReplayOptions{Types: []string{"utf8.x"}}).Next(); err != nil || got.GetId() != "kept" {
		t.Fatalf("replay after the refusals: %v, %v", got, err)
	}
}

// cancelOnBreak is a client stream that cancels the caller's context as soon as a read from it fails: a
// caller that gives up right as the stream breaks, before anything could reopen it.
type cancelOnBreak struct {
	grpc.ClientStream
	cancel context.CancelFunc
}

func (s cancelOnBreak) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.cancel()
	}
	return err
}

func TestAReplayWhoseContextEndsWhileItBacksOffReturnsTheContextsError(t *testing.T) {
	bus := &brokenReplay{}
	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	giveUp := grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		stream, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return cancelOnBreak{ClientStream: stream, cancel: cancel}, nil
	})
	client := connectServing(t, func(s *grpc.Server) { nervepb.RegisterEventBusServer(s, bus) }, giveUp)
	replay := client.Replay(ctx, nerve.ReplayOptions{})
	for _, want := range []string{"r1", "r2"} {
		if e, err := replay.Next(); err != nil || e.GetId() != want {
			t.Fatalf("want %s, got %v, %v", want, e.GetId(), err)
		}
	}
	// the stream breaks with Unavailable, mid-history: the replay backs off to reopen it, and its context
	// has ended by then
	_, err := replay.Next()
	if !errors.Is(err, context.Canceled) || nerve.Code(err) != codes.Canceled {
		t.Fatalf("a replay whose context ended while it backed off: %v, want the context's error", err)
	}
	if calls := bus.calls.Load(); calls != 1 {
		t.Fatalf("%d calls: the replay reopened after its context ended", calls)
	}
}

// A replay's wait before reopening doubles from 0.2 s and stops at 5 s, so a server back after a
// restart is used within 5 s whatever MaxResumes allows, and a large MaxResumes never overflows it.
func TestReplayReopeningWaitsAtMostFiveSeconds(t *testing.T) {
	want := map[int]time.Duration{
		1: 200 * time.Millisecond, 2: 400 * time.Millisecond, 5: 3200 * time.Millisecond,
		6: 5 * time.Second, 10: 5 * time.Second, 40: 5 * time.Second, 100: 5 * time.Second,
	}
	for n, wait := range want {
		if got := nerve.ResumeBackoff(n); got != wait {
			t.Errorf("wait before reopening %d = %v, want %v", n, got, wait)
		}
	}
}
