package nerve_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	nerve "github.com/nerve-bus/nerve/clients/go"
	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// wait is the longest any single expected event may take before a test fails.
const wait = 10 * time.Second

var (
	ansi     = regexp.MustCompile(`\x1b\[[0-9;]*m`)
	addrLine = regexp.MustCompile(`addr=(\S+)`)
)

// serverBinary is $NERVE_SERVER_BIN, or target/debug/nerve-server of the repository.
func serverBinary(t *testing.T) string {
	t.Helper()
	repo, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	bin := os.Getenv("NERVE_SERVER_BIN")
	if bin == "" {
		bin = filepath.Join(repo, "target", "debug", "nerve-server")
	}
	if info, err := os.Stat(bin); err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		t.Fatalf("nerve-server binary not found at %s: run `cargo build --bin nerve-server` in %s "+
			"(or point NERVE_SERVER_BIN at a built nerve-server)", bin, repo)
	}
	return bin
}

// startServer runs its own nerve-server child process on 127.0.0.1:0 with a fresh data dir and returns
// the address it logged; the process is stopped (SIGTERM) when the test ends. settings are extra
// environment variables for it ("NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL=1").
func startServer(t *testing.T, settings ...string) string {
	t.Helper()
	cmd := exec.Command(serverBinary(t), "--listen", "127.0.0.1:0", "--data-dir", t.TempDir())
	env := append([]string{"NERVE_LOG_LEVEL=info", "NO_COLOR=1"}, settings...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NERVE_") && !strings.HasPrefix(kv, "RUST_LOG=") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nerve-server: %v", err)
	}
	exited := make(chan struct{})
	addrs := make(chan string, 1)
	go func() { // read the log until the child exits, so it never blocks on a full pipe
		scanner := bufio.NewScanner(stderr)
		found := false
		for scanner.Scan() {
			if m := addrLine.FindStringSubmatch(ansi.ReplaceAllString(scanner.Text(), "")); m != nil && !found {
				found = true
				addrs <- m[1]
			}
		}
		close(addrs)
	}()
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(wait):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	select {
	case addr, ok := <-addrs:
		if !ok {
			t.Fatal("nerve-server exited before listening")
		}
		return addr
	case <-time.After(wait):
		t.Fatal("nerve-server did not report its listen address in time")
	}
	return ""
}

// connect starts a server for this test, with the extra settings of startServer, and returns a client
// connected to it.
func connect(t *testing.T, settings ...string) *nerve.Client {
	t.Helper()
	client, err := nerve.Dial(startServer(t, settings...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// The issuer and audience the servers of startAuthServer expect in a token.
const (
	tokenIssuer   = "https://issuer.nerve.test"
	tokenAudience = "nerve-tests"
)

// authServer is a server of startAuthServer: its address and the HMAC secret its tokens are signed with.
type authServer struct {
	addr   string
	secret []byte
}

// startAuthServer runs a server as startServer does, with JWT authentication on: HS256 tokens of
// tokenIssuer for tokenAudience, no leeway (a token is refused, and a stream opened with it ended, from
// its exp on), and policy (TOML [[principal]] entries) as the policy file. settings are extra variables.
func startAuthServer(t *testing.T, policy string, settings ...string) *authServer {
	t.Helper()
	dir := t.TempDir()
	raw := make([]byte, 32)
	_, _ = rand.Read(raw)
	secret := []byte(hex.EncodeToString(raw)) // text: the server trims whitespace around the secret
	secretFile, policyFile := filepath.Join(dir, "hs-secret"), filepath.Join(dir, "policy.toml")
	if err := os.WriteFile(secretFile, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := startServer(t, append([]string{
		"NERVE_AUTH__JWT__ISSUER=" + tokenIssuer,
		"NERVE_AUTH__JWT__AUDIENCE=" + tokenAudience,
		"NERVE_AUTH__JWT__ALGORITHMS=HS256",
		"NERVE_AUTH__JWT__HS_SECRET_FILE=" + secretFile,
		"NERVE_AUTH__JWT__LEEWAY=0s",
		"NERVE_AUTH__POLICY_FILE=" + policyFile,
	}, settings...)...)
	return &authServer{addr: addr, secret: secret}
}

// mint signs a token of subject that expires at exp (whole seconds, as a JWT carries it).
func (s *authServer) mint(t *testing.T, subject string, exp time.Time) string {
	t.Helper()
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"sub": subject,
		"iss": tokenIssuer,
		"aud": tokenAudience,
		"exp": exp.Unix(),
	}).SignedString(s.secret)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// bearer is per-RPC credentials (grpc.WithPerRPCCredentials) that ask token for the token of each call,
// as it starts, and send it over plaintext too.
type bearer func() string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b()}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// testContext is bounded, so that a hung call fails the test instead of the run.
func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*wait)
	t.Cleanup(cancel)
	return ctx
}

// ev builds a valid event with text data.
func ev(id, eventType string) *nervepb.Event {
	return nerve.NewEvent("//tests", eventType).ID(id).Text("payload of " + id).MustBuild()
}

// next returns the next delivery within wait.
func next(t *testing.T, sub *nerve.Subscription) *nerve.Delivery {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	d, err := sub.Next(ctx)
	if err != nil {
		t.Fatalf("no delivery within %s: %v", wait, err)
	}
	return d
}

// expectIdle asserts nothing is delivered while the server sends `beats` heartbeats (its own idle signal);
// it returns the last heartbeat.
func expectIdle(t *testing.T, sub *nerve.Subscription, beats int) *nervepb.Heartbeat {
	t.Helper()
	var last *nervepb.Heartbeat
	for seen := 0; seen < beats; {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		m, err := sub.NextMessage(ctx)
		cancel()
		if err != nil {
			t.Fatalf("expected heartbeats: %v", err)
		}
		if m.Delivery != nil {
			t.Fatalf("expected no delivery, got %s (attempt %d)", m.Delivery.Event.GetId(), m.Delivery.Attempt)
		}
		if m.Heartbeat != nil {
			last = m.Heartbeat
			seen++
		}
	}
	return last
}

// eventually polls a server-side effect that no stream announces, failing after wait.
func eventually[T any](t *testing.T, what string, check func() (T, bool)) T {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		if v, ok := check(); ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// proxy forwards TCP connections to a server; freeze silences the ones open at that moment.
type proxy struct {
	addr   string
	closed chan struct{}
	mu     sync.Mutex
	// frozen is closed by freeze; connections accepted after it get a new one
	frozen chan struct{}
}

// startProxy listens on 127.0.0.1:0 and forwards every connection to target; the listener and the
// connections are closed when the test ends. freeze stops the connections open at that moment from
// forwarding, in both directions, without closing anything: to either end, they die silently (no FIN,
// no RST), as in a partition. Connections made after it forward as before, as to a host reached again.
func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{addr: ln.Addr().String(), frozen: make(chan struct{}), closed: make(chan struct{})}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		close(p.closed)
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return // closed
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, client, server)
			mu.Unlock()
			p.mu.Lock()
			frozen := p.frozen
			p.mu.Unlock()
			go p.forward(server, client, frozen)
			go p.forward(client, server, frozen)
		}
	}()
	return p
}

// freeze silences the connections open now.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.frozen)
	p.frozen = make(chan struct{})
}

// forward copies from src to dst until either fails; once frozen it holds what it read, without writing
// or closing, until the test ends.
func (p *proxy) forward(dst, src net.Conn, frozen <-chan struct{}) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-frozen:
			<-p.closed
			return
		default:
		}
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
