package nerve_test

// Authentication: what the client does when the server ends a stream because its bearer token expired.

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// replayerPolicy lets the principal "replayer" publish (from its own sources: "replayer", "replayer/...")
// and replay every type.
const replayerPolicy = `
[[principal]]
id = "replayer"
allow = { publish = [">"], replay = [">"] }
`

// dialWith connects to addr with opts; the client is closed when the test ends.
func dialWith(t *testing.T, addr string, opts ...grpc.DialOption) *nerve.Client {
	t.Helper()
	client, err := nerve.Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// expiresIn is the expiry of a token that lives at least ttl from now, in the whole seconds of a JWT.
func expiresIn(ttl time.Duration) time.Time {
	return time.Now().Add(ttl).Truncate(time.Second).Add(time.Second)
}

// sleepPast waits until a little after exp, the expiry of a token minted within the last few seconds.
func sleepPast(t *testing.T, exp time.Time) {
	t.Helper()
	left := time.Until(exp.Add(500 * time.Millisecond))
	if left > wait {
		t.Fatalf("a token expiring %s from now: not a short-lived one", left)
	}
	time.Sleep(left)
}

func TestReplayResumesWhenItsTokenExpires(t *testing.T) {
	server := startAuthServer(t, replayerPolicy)
	ctx := testContext(t)
	publisher := dialWith(t, server.addr, grpc.WithPerRPCCredentials(bearer(func() string {
		return server.mint(t, "replayer", time.Now().Add(time.Hour))
	})))
	// 3,000 events of about 1 KB: 30 pages of 100, about 3 MB, far more than the server buffers for a
	// stream whose reader holds back behind the small windows below
	const events, batch, pageSize = 3000, 500, 100
	data := strings.Repeat("x", 1000)
	for start := 0; start < events; start += batch {
		evs := make([]*nervepb.Event, batch)
		for i := range evs {
			evs[i] = nerve.NewEvent("replayer", "history.v1").ID(fmt.Sprintf("h-%04d", start+i)).Text(data).MustBuild()
		}
		if _, err := publisher.Publish(ctx, evs...); err != nil {
			t.Fatal(err)
		}
	}
	// HTTP/2 windows fixed at 64 KiB (a fixed window also stops grpc-go from widening it), so that while the
	// test waits for the token to expire the server cannot push the rest of the history
	small := []grpc.DialOption{grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535)}
	opts := nerve.ReplayOptions{Types: []string{"history.v1"}, PageSize: pageSize}

	t.Run("with credentials that refresh", func(t *testing.T) {
		t.Parallel()
		var mu sync.Mutex
		var expiries []time.Time // one per call: each opening of the replay's stream asks for a token
		creds := bearer(func() string {
			exp := expiresIn(2 * time.Second)
			mu.Lock()
			expiries = append(expiries, exp)
			mu.Unlock()
			return server.mint(t, "replayer", exp)
		})
		replay := dialWith(t, server.addr, append(small, grpc.WithPerRPCCredentials(creds))...).Replay(ctx, opts)
		defer replay.Close()
		first, err := replay.NextPage()
		if err != nil {
			t.Fatal(err)
		}
		got := first.GetEvents()
		mu.Lock()
		firstExpiry := expiries[0]
		mu.Unlock()
		// the server ends the stream when its token expires, after the pages it had sent
		sleepPast(t, firstExpiry)
		for {
			e, err := replay.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("after %d events: %v", len(got), err)
			}
			got = append(got, e)
		}
		if len(got) != events {
			t.Fatalf("replayed %d events, want %d", len(got), events)
		}
		for i, e := range got {
			if want := fmt.Sprintf("h-%04d", i); e.GetId() != want || (i > 0 && e.GetSequence() <= got[i-1].GetSequence()) {
				t.Fatalf("event %d is %s (sequence %d), want %s after sequence %d: skipped or repeated",
					i, e.GetId(), e.GetSequence(), want, got[max(i-1, 0)].GetSequence())
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if len(expiries) < 2 {
			t.Fatalf("the replay was never reopened (%d token minted): it finished before its token expired", len(expiries))
		}
		t.Logf("%d streams, one per token", len(expiries))
	})

	t.Run("with a token that stays expired", func(t *testing.T) {
		t.Parallel()
		exp := expiresIn(2 * time.Second)
		token := server.mint(t, "replayer", exp)
		var calls atomic.Int32
		creds := bearer(func() string { calls.Add(1); return token })
		client := dialWith(t, server.addr, append(small, grpc.WithPerRPCCredentials(creds))...)
		replay := client.Replay(ctx, opts)
		defer replay.Close()
		first, err := replay.NextPage()
		if err != nil {
			t.Fatal(err)
		}
		n := len(first.GetEvents())
		sleepPast(t, exp)
		for {
			_, err = replay.Next()
			if err != nil {
				break
			}
			n++
		}
		var e *nerve.Error
		if !errors.Is(err, nerve.ErrTokenExpired) || !errors.Is(err, nerve.ErrUnauthenticated) ||
			!errors.As(err, &e) || e.Reason != "TOKEN_EXPIRED" {
			t.Fatalf("after %d events: %v, want ErrTokenExpired", n, err)
		}
		if n >= events {
			t.Fatalf("all %d events arrived: the replay finished before its token expired", n)
		}
		t.Logf("%d events before the token expired", n)
		// the default MaxResumes is 3, but a second refusal as expired with no page between ends it
		if c := calls.Load(); c != 2 {
			t.Fatalf("%d calls, want 2: the stream, then one reopening refused", c)
		}
		// a replay whose token has already expired is refused at once, and reopened only once
		_, err = client.Replay(ctx, opts).NextPage()
		if !errors.Is(err, nerve.ErrTokenExpired) {
			t.Fatalf("a replay opened with an expired token: %v, want ErrTokenExpired", err)
		}
		if c := calls.Load(); c != 4 {
			t.Fatalf("%d calls in all, want 4: two more for the replay opened after expiry", c)
		}
	})
}
