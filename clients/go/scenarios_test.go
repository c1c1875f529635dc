package nerve_test

// The cross-client scenarios of clients/SCENARIOS.md, each against its own nerve-server process.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

func TestPublishReturnsSequences(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	results, err := client.Publish(ctx, ev("a", "scenario.created"), ev("b", "scenario.created"))
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2 || results[0].GetId() != "a" || results[1].GetId() != "b" {
		t.Fatalf("results = %v", results)
	}
	if results[0].GetSequence() == 0 || results[1].GetSequence() != results[0].GetSequence()+1 {
		t.Fatalf("sequences %d, %d are not consecutive", results[0].GetSequence(), results[1].GetSequence())
	}
	if results[0].GetDuplicate() || results[1].GetDuplicate() {
		t.Fatal("first publish reported a duplicate")
	}
	stored, err := client.GetEvent(ctx, "b", "")
	if err != nil {
		t.Fatal(err)
	}
	if stored.GetSequence() != results[1].GetSequence() || stored.GetTextData() != "payload of b" {
		t.Fatalf("stored = %v", stored)
	}
}

func TestPublishRetryIsIdempotent(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	first, err := client.Publish(ctx, ev("once", "scenario.created"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.Publish(ctx, ev("once", "scenario.created"))
	if err != nil {
		t.Fatal(err)
	}
	if again[0].GetSequence() != first[0].GetSequence() || !again[0].GetDuplicate() {
		t.Fatalf("retry = %v, first = %v", again[0], first[0])
	}
	changed := nerve.NewEvent("//tests", "scenario.created").ID("once").Text("different data").MustBuild()
	_, err = client.Publish(ctx, changed)
	if !errors.Is(err, nerve.ErrAlreadyExists) || nerve.Code(err) != codes.AlreadyExists || status.Code(err) != codes.AlreadyExists {
		t.Fatalf("same id with different data: %v", err)
	}
	// neither the retry nor the conflict wrote anything
	after, err := client.Publish(ctx, ev("next", "scenario.created"))
	if err != nil {
		t.Fatal(err)
	}
	if after[0].GetSequence() != first[0].GetSequence()+1 {
		t.Fatalf("next sequence %d after %d", after[0].GetSequence(), first[0].GetSequence())
	}
}

func TestInvalidEventNamesTheField(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	noType := ev("typeless", "scenario.created")
	noType.Type = ""
	_, err := client.Publish(ctx, noType)
	var e *nerve.Error
	if !errors.As(err, &e) || e.Code != codes.InvalidArgument || !errors.Is(err, nerve.ErrInvalidArgument) {
		t.Fatalf("want InvalidArgument, got %v", err)
	}
	v, ok := e.Violation("events[0].type")
	if !ok || v.Description == "" {
		t.Fatalf("no violation of events[0].type in %v", e.FieldViolations)
	}
	if !strings.Contains(err.Error(), "events[0].type") {
		t.Fatalf("message %q does not name the field", err)
	}
}

func TestPrivateSubscriptionCatchesUpThenGoesLive(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	stored, err := client.Publish(ctx, ev("h0", "orders.created"), ev("h1", "orders.created"), ev("h2", "orders.created"))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types:             []string{"orders.*"},
		Start:             nerve.StartEarliest(),
		HeartbeatInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, ok := sub.CaughtUp(); ok {
		t.Fatal("caught up before reading anything")
	}
	waitCtx, cancel := context.WithTimeout(ctx, wait)
	history, err := sub.UntilCaughtUp(waitCtx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	var seqs []uint64
	for _, d := range history {
		ids = append(ids, d.Event.GetId())
		seqs = append(seqs, d.Sequence())
	}
	if !slices.Equal(ids, []string{"h0", "h1", "h2"}) {
		t.Fatalf("history before caught-up = %v", ids)
	}
	for i, r := range stored {
		if seqs[i] != r.GetSequence() {
			t.Fatalf("sequences %v, published %v", seqs, stored)
		}
	}
	if seq, ok := sub.CaughtUp(); !ok || seq != stored[2].GetSequence() {
		t.Fatalf("caught up at %d (%v), want %d", seq, ok, stored[2].GetSequence())
	}
	if err := sub.Ack(history...); err != nil {
		t.Fatal(err)
	}

	live, err := client.Publish(ctx, ev("live", "orders.created"))
	if err != nil {
		t.Fatal(err)
	}
	d := next(t, sub)
	if d.Event.GetId() != "live" || d.Sequence() != live[0].GetSequence() || d.Attempt != 1 {
		t.Fatalf("live delivery = %s seq %d attempt %d", d.Event.GetId(), d.Sequence(), d.Attempt)
	}
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
}

func TestGroupRedeliversAfterNackAndAcks(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{
		Types:             []string{"jobs.run"},
		Group:             "workers",
		HeartbeatInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if sub.Subscribed().GetGroup() != "workers" || sub.Subscribed().GetHeartbeatInterval().AsDuration() != 200*time.Millisecond {
		t.Fatalf("subscribed = %v", sub.Subscribed())
	}
	published, err := client.Publish(ctx, ev("job-1", "jobs.run"))
	if err != nil {
		t.Fatal(err)
	}
	first := next(t, sub)
	if first.Event.GetId() != "job-1" || first.Sequence() != published[0].GetSequence() || first.Attempt != 1 {
		t.Fatalf("first = %s attempt %d", first.Event.GetId(), first.Attempt)
	}
	if first.AckDeadline.IsZero() {
		t.Fatal("a group delivery has an ack deadline")
	}
	if err := first.Nack(200 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	again := next(t, sub)
	if again.Event.GetId() != "job-1" || again.Attempt != 2 {
		t.Fatalf("redelivery = %s attempt %d", again.Event.GetId(), again.Attempt)
	}
	if err := again.Ack(); err != nil {
		t.Fatal(err)
	}
	if beat := expectIdle(t, sub, 2); beat.GetInFlight() != 0 {
		t.Fatalf("in flight after the ack: %d", beat.GetInFlight())
	}
	group, err := client.Group(ctx, "workers")
	if err != nil {
		t.Fatal(err)
	}
	if group == nil || group.GetPending() != 0 || group.GetDeadLetters() != 0 {
		t.Fatalf("group = %v", group)
	}
}

func TestRequestReplyRoundTrip(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	responder, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"planner.plan.requested"}, Group: "planners"})
	if err != nil {
		t.Fatal(err)
	}
	defer responder.Close()

	asked := nerve.NewEvent("//tests", "planner.plan.requested").ID("q1").CorrelationID("conversation-1").Text("plan it").MustBuild()
	type result struct {
		resp *nervepb.RequestResponse
		err  error
	}
	answered := make(chan result, 1)
	go func() {
		resp, err := client.Request(ctx, asked, wait)
		answered <- result{resp, err}
	}()

	d := next(t, responder)
	if d.Event.GetId() != "q1" || d.ReplyTo() == "" || d.Event.GetCorrelationId() != "conversation-1" {
		t.Fatalf("request delivery = %v", d.Event)
	}
	sent, err := client.Reply(ctx, d.ReplyTo(), ev("a1", "planner.plan.ready"))
	if err != nil {
		t.Fatal(err)
	}
	if !sent.GetDelivered() {
		t.Fatal("the requester was waiting, the reply must be delivered")
	}
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-answered:
	case <-time.After(wait):
		t.Fatal("no answer to the request in time")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	reply := r.resp.GetReply()
	if reply.GetId() != "a1" || reply.GetCorrelationId() != "conversation-1" || reply.GetCausationId() != "q1" {
		t.Fatalf("reply = %v", reply)
	}
	if reply.GetSequence() != sent.GetSequence() || r.resp.GetRequestSequence() != d.Sequence() {
		t.Fatalf("reply sequence %d (stored %d), request sequence %d (delivered %d)",
			reply.GetSequence(), sent.GetSequence(), r.resp.GetRequestSequence(), d.Sequence())
	}
}

func TestRequestWithoutRespondersFailsFast(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	started := time.Now()
	_, err := client.Request(ctx, ev("lonely", "planner.plan.requested"), 30*time.Second)
	elapsed := time.Since(started)
	var e *nerve.Error
	if !errors.As(err, &e) || e.Code != codes.FailedPrecondition {
		t.Fatalf("want FailedPrecondition, got %v", err)
	}
	if !errors.Is(err, nerve.ErrNoResponders) || !errors.Is(err, nerve.ErrFailedPrecondition) || e.Reason != "NO_RESPONDERS" {
		t.Fatalf("want no responders, got %v (reason %q)", err, e.Reason)
	}
	if !strings.Contains(e.Message, "no responders") {
		t.Fatalf("message %q", e.Message)
	}
	if elapsed > 5*time.Second {
		t.Fatalf("fails at once, not at the 30s timeout (took %s)", elapsed)
	}
}

func TestReplayPagesWithResumeToken(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	events := make([]*nervepb.Event, 250)
	for i := range events {
		events[i] = ev(fmt.Sprintf("r%d", i), "replay.tick")
	}
	results, err := client.Publish(ctx, events...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Publish(ctx, ev("unrelated", "other.tick")); err != nil {
		t.Fatal(err)
	}
	var expected []uint64
	for _, r := range results {
		expected = append(expected, r.GetSequence())
	}

	var seen []uint64
	first := client.Replay(ctx, nerve.ReplayOptions{Types: []string{"replay.tick"}, PageSize: 100, Limit: 150})
	var sizes []int
	for {
		page, err := first.NextPage()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, len(page.GetEvents()))
		for _, e := range page.GetEvents() {
			seen = append(seen, e.GetSequence())
		}
	}
	if !slices.Equal(sizes, []int{100, 50}) {
		t.Fatalf("page sizes %v, want [100 50]", sizes)
	}
	if first.EndOfHistory() || first.ResumeToken() == "" {
		t.Fatalf("after the limit: end of history %v, token %q", first.EndOfHistory(), first.ResumeToken())
	}

	rest := client.Replay(ctx, nerve.ReplayOptions{Types: []string{"replay.tick"}, PageSize: 100, ResumeToken: first.ResumeToken()})
	for e, err := range rest.All() {
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, e.GetSequence())
	}
	if !rest.EndOfHistory() {
		t.Fatal("the resumed replay reaches the end of history")
	}
	if !slices.Equal(seen, expected) {
		t.Fatalf("saw %d events, want all 250 once in order", len(seen))
	}
}

// After a connection went silent, Dial's keepalive replaces it: a Subscribe made before that fails with
// Unavailable, and the next one goes out on a new connection. Without keepalive, it would wait on the
// silent connection until the operating system gave up on it (about 15 minutes).
func TestSubscribingAgainAfterASilentConnectionGetsANewOne(t *testing.T) {
	ctx := testContext(t)
	through := startProxy(t, startServer(t))
	// Dial's own keepalive, shortened: grpc-go pings no more often than every 10 s
	saved := *nerve.KeepaliveParams
	t.Cleanup(func() { *nerve.KeepaliveParams = saved })
	*nerve.KeepaliveParams = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: time.Second, PermitWithoutStream: true}
	client, err := nerve.Dial(through.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	opts := nerve.SubscribeOptions{Types: []string{"again.x"}, HeartbeatInterval: 200 * time.Millisecond}
	sub, err := client.Subscribe(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	expectIdle(t, sub, 2)
	through.freeze()
	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for err == nil {
		_, err = sub.NextMessage(waitCtx)
	}
	if !errors.Is(err, nerve.ErrUnavailable) {
		t.Fatalf("after the connection went silent: %v, want Unavailable", err)
	}
	_ = sub.Close()

	// within the keepalive's 11 s, and a bound well short of the operating system's
	againCtx, cancelAgain := context.WithTimeout(ctx, 30*time.Second)
	defer cancelAgain()
	var again *nerve.Subscription
	for again == nil {
		again, err = client.Subscribe(againCtx, opts)
		if err != nil && !errors.Is(err, nerve.ErrUnavailable) {
			t.Fatalf("subscribing again: %v, want it to work or fail with Unavailable", err)
		}
	}
	defer again.Close()
	if _, err := client.Publish(againCtx, ev("again-1", "again.x")); err != nil {
		t.Fatal(err)
	}
	if d := next(t, again); d.Event.GetId() != "again-1" {
		t.Fatalf("got %s, want again-1", d.Event.GetId())
	}
}

func TestSilentConnectionIsDetected(t *testing.T) {
	ctx := testContext(t)
	through := startProxy(t, startServer(t))
	client, err := nerve.Dial(through.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	const interval = 200 * time.Millisecond
	sub, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"quiet.x"}, HeartbeatInterval: interval})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if got := sub.Subscribed().GetHeartbeatInterval().AsDuration(); got != interval {
		t.Fatalf("subscribed with a heartbeat interval of %s, want %s", got, interval)
	}
	// idle for 5 intervals, longer than the timeout of 3: the heartbeats keep the stream open
	expectIdle(t, sub, 5)

	through.freeze()
	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for err == nil { // heartbeats that got through before the freeze come first
		var m nerve.Message
		if m, err = sub.NextMessage(waitCtx); m.Delivery != nil {
			t.Fatalf("unexpected delivery %s", m.Delivery.Event.GetId())
		}
	}
	if !errors.Is(err, nerve.ErrUnavailable) || !strings.Contains(err.Error(), "heartbeats") {
		t.Fatalf("after the connection went silent: %v, want Unavailable naming the heartbeats", err)
	}
}

func TestRequestAndReplyRefuseAStringThatIsNotUTF8(t *testing.T) {
	client, ctx := connect(t), testContext(t)
	responder, err := client.Subscribe(ctx, nerve.SubscribeOptions{Types: []string{"utf8.asked"}, Group: "utf8-planners"})
	if err != nil {
		t.Fatal(err)
	}
	defer responder.Close()
	// protobuf cannot encode it: sent, grpc-go would fail the call with INTERNAL, naming no field
	_, err = client.Request(ctx, nerve.NewEvent("//tests", "utf8.asked").ID("bad").Subject("eu-\xff").MustBuild(), wait)
	wantViolation(t, err, "event.subject")

	answered := make(chan error, 1)
	go func() {
		resp, err := client.Request(ctx, ev("q1", "utf8.asked"), wait)
		if err == nil && resp.GetReply().GetId() != "a1" {
			err = fmt.Errorf("reply %v", resp.GetReply())
		}
		answered <- err
	}()
	d := next(t, responder)
	if d.Event.GetId() != "q1" {
		t.Fatalf("request delivery %s: the refused request was sent", d.Event.GetId())
	}
	_, err = client.Reply(ctx, d.ReplyTo(), nerve.NewEvent("//tests", "utf8.ready\xff").ID("a0").MustBuild())
	wantViolation(t, err, "event.type")
	_, err = client.Reply(ctx, d.ReplyTo()+"\xff", ev("a0", "utf8.ready"))
	wantViolation(t, err, "reply_to")
	// the connection and the request go on: a valid reply is delivered
	sent, err := client.Reply(ctx, d.ReplyTo(), ev("a1", "utf8.ready"))
	if err != nil || !sent.GetDelivered() {
		t.Fatalf("reply after the refusals: %v, %v", sent, err)
	}
	if err := d.Ack(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-answered:
		if err != nil {
			t.Fatalf("request after the refusal: %v", err)
		}
	case <-time.After(wait):
		t.Fatal("no answer to the request in time")
	}
}
