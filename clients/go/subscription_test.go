package nerve_test

// The Subscription beyond the shared scenarios: a stream that ends with deliveries unread, concurrent
// readers of its state, settle arguments checked before sending.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

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
	client, ctx := connect(t), testContext(t)
	sub, first := endWithDeliveriesUnread(t, client, ctx, "closers")
	acked := make(chan error, 1)
	go func() { acked <- ackUntilRefused(first) }()
	time.Sleep(200 * time.Millisecond) // let the acks reach the end of the stream
	if err := within(t, "close with unread deliveries and an ack in progress", sub.Close); err != nil {
		t.Fatal(err)
	}
	if err := within(t, "the ack after close", func() error { return <-acked }); err == nil {
		t.Fatal("an ack on an ended stream succeeded")
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
