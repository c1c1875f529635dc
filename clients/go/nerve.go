// Package nerve is the Go client of Nerve, a gRPC event bus.
//
// Dial a server, publish CloudEvents, subscribe to them (privately or in durable groups with acks,
// redelivery and dead letters), ask requests and reply to them, replay history, and inspect the bus:
//
//	client, err := nerve.Dial("127.0.0.1:50051")
//	if err != nil { ... }
//	defer client.Close()
//	ev := nerve.NewEvent("//billing", "invoice.paid.v1").JSON(map[string]int{"amount": 12}).MustBuild()
//	results, err := client.Publish(ctx, ev)
//
// The generated messages and stubs are in the nervepb package. Every error a call returns for a failed
// RPC is an *Error carrying the gRPC code and the BadRequest field violations the server sent. A request
// with a string that is not valid UTF-8, which protobuf cannot encode, is refused before sending by every
// call and stream of this package (not the raw stubs) with ErrInvalidArgument naming the field ("group").
package nerve

import (
	"context"
	"math"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// requestGrace is the extra time a request's gRPC deadline gets beyond the timeout it asks for, so that
// the server's own timeout answers first (with its message) when the caller's context has no deadline.
const requestGrace = 5 * time.Second

// Client is a connection to a Nerve server. It is safe for concurrent use.
type Client struct {
	conn  *grpc.ClientConn
	bus   nervepb.EventBusClient
	admin nervepb.AdminClient
}

// keepaliveParams is the keepalive Dial sets: the server's own (a ping after 30 s without anything
// received, the connection dead without an answer within 10 s), with or without calls open.
var keepaliveParams = keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}

// Dial connects to target ("host:port"). Without options the connection is plaintext; pass
// grpc.WithTransportCredentials (and any other grpc.DialOption) to change that. The connection is made
// lazily and re-made when it breaks. It is also pinged after 30 s without anything received, and taken
// for dead when no answer comes within 10 s, so one that died silently (a partition, a host gone) is
// replaced within about 40 s; grpc.WithKeepaliveParams in opts changes that. It receives messages of any
// size, as the server bounds its own (max_batch_bytes + 1 MiB);
// grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(n)) in opts sets a limit.
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	all := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithKeepaliveParams(keepaliveParams),
		// a page of replay or dead letters holds up to max_batch_bytes (4 MiB by default) of events plus
		// their framing, more than grpc-go's default 4 MiB receive limit. opts come after, so they override
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
	}, opts...)
	conn, err := grpc.NewClient(target, all...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, bus: nervepb.NewEventBusClient(conn), admin: nervepb.NewAdminClient(conn)}, nil
}

// Close closes the connection; open calls fail.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the underlying connection.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// EventBusStub is the generated EventBus stub, for anything this package does not cover.
func (c *Client) EventBusStub() nervepb.EventBusClient { return c.bus }

// AdminStub is the generated Admin stub.
func (c *Client) AdminStub() nervepb.AdminClient { return c.admin }

// Publish commits the events atomically and returns one result (id, sequence, duplicate) per event, in
// order. Publishing the same (source, id) again returns the original sequence with Duplicate set; the same
// (source, id) with different content fails with codes.AlreadyExists. An event with a string that is not
// valid UTF-8 is refused before sending, with ErrInvalidArgument naming the field, and so is a call
// without events (naming "events").
func (c *Client) Publish(ctx context.Context, events ...*nervepb.Event) ([]*nervepb.PublishResult, error) {
	if len(events) == 0 {
		return nil, errNoEvents()
	}
	// refused as Publisher.Publish refuses it
	resp, err := unary(ctx, c.bus.Publish, &nervepb.PublishRequest{Events: events})
	if err != nil {
		return nil, err
	}
	return resp.GetResults(), nil
}

// Request publishes ev as a request and waits up to timeout (zero: the server's default request timeout,
// 30s unless configured otherwise) for one reply. The response carries the reply event (with the request's
// correlation id) and the request's sequence. It fails at once with ErrNoResponders when no connected
// subscriber could receive the request, and with codes.DeadlineExceeded when no reply came in time. A
// deadline of ctx shortens the wait. When ctx has none, the call gets timeout plus a few seconds as its
// deadline, so that the server's answer comes first; with a zero timeout it gets none, and the server
// answers at its own timeout. A negative timeout is ErrInvalidArgument, returned without sending.
func (c *Client) Request(ctx context.Context, ev *nervepb.Event, timeout time.Duration) (*nervepb.RequestResponse, error) {
	if timeout < 0 { // sent as none, it would wait the server's default instead
		return nil, invalidArgument("timeout", "must be a non-negative duration")
	}
	req := &nervepb.RequestRequest{Event: ev}
	if timeout > 0 {
		req.Timeout = durationpb.New(timeout)
		if _, ok := ctx.Deadline(); !ok {
			// only a bound against a server that never answers; without a timeout the client cannot know
			// the server's default, and a guess shorter than it would cut the wait short
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout+requestGrace)
			defer cancel()
		}
	}
	return unary(ctx, c.bus.Request, req)
}

// Reply answers a request: replyTo is the request's inbox (Delivery.ReplyTo). The response says whether
// the reply reached the requester (Delivered: false when it had stopped waiting, or another
// responder's reply came first) and the stored reply's sequence (zero when none was stored). An empty
// replyTo (the event was not a request) is ErrInvalidArgument naming "reply_to", returned without sending.
func (c *Client) Reply(ctx context.Context, replyTo string, ev *nervepb.Event) (*nervepb.ReplyResponse, error) {
	if replyTo == "" { // the server's own refusal, made without sending
		return nil, invalidArgument("reply_to", "is required: the event is not a request")
	}
	return unary(ctx, c.bus.Reply, &nervepb.ReplyRequest{ReplyTo: replyTo, Event: ev})
}
