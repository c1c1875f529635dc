package nerve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// ErrPublisherClosed is returned by Publisher.Publish after Close.
var ErrPublisherClosed = errors.New("nerve: publisher closed")

// errNoEvents is Client.Publish's and Publisher.Publish's answer to a call without events: the server's
// own refusal (ErrInvalidArgument naming "events"), made without sending.
func errNoEvents() error { return invalidArgument("events", "at least one event is required") }

// Publisher publishes batch after batch on one PublishStream, without a call per batch. It is safe for
// concurrent use: calls from many goroutines are pipelined on the one stream. Each Publish is one atomic
// batch, committed after every batch sent before it on the stream (so sequences follow send order), and
// answered in that order. Close it when done; the context given to OpenPublisher bounds the stream.
type Publisher struct {
	stream nervepb.EventBus_PublishStreamClient
	cancel context.CancelFunc
	done   chan struct{} // closed when the receiver stopped; ended and err are set before

	// sendLock (one slot) keeps "send a request" and "queue its waiter" in the same order; it is a channel
	// so that a Publish whose context ends while another call is held by flow control can give up.
	sendLock chan struct{}
	nextID   uint64 // guarded by sendLock

	mu      sync.Mutex
	pending []*publishWaiter // sent and unanswered, in send order
	closed  bool             // Close was called
	ended   bool             // the receiver stopped
	err     error            // the stream's final error (nil: ended OK)
	gaveUp  error            // the context's error of a Close that gave up: what every Close returns then
}

// publishWaiter is one sent request waiting for its answer.
type publishWaiter struct {
	id     uint64
	answer chan publishOutcome // buffered: the receiver never waits for an abandoned call
}

type publishOutcome struct {
	results []*nervepb.PublishResult
	err     error
}

// OpenPublisher opens a PublishStream and waits for the server's answer to the opening (one round trip),
// so that a stream-level refusal (unauthenticated, too many open streams) is returned here, as the same
// *Error a Publish on the stream would get. ctx bounds the wait and the whole stream: cancel it, or call
// Close, to end it.
func (c *Client) OpenPublisher(ctx context.Context) (*Publisher, error) {
	streamCtx, cancel := context.WithCancel(ctx)
	stream, err := c.bus.PublishStream(streamCtx)
	if err == nil {
		err = opened(stream)
	}
	if err != nil {
		cancel()
		return nil, wrap(err)
	}
	p := &Publisher{
		stream:   stream,
		cancel:   cancel,
		done:     make(chan struct{}),
		sendLock: make(chan struct{}, 1),
	}
	go p.receive()
	return p, nil
}

// opened waits for the server's answer to the opening of stream: nil once its response headers came,
// else why the stream ended (a refusal comes as a response without headers; Recv has its status). The
// server answers before reading any request, and the stream's context bounds the wait.
func opened(stream nervepb.EventBus_PublishStreamClient) error {
	header, err := stream.Header()
	if err != nil || header != nil {
		return err
	}
	if _, err := stream.Recv(); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return fmt.Errorf("nerve: publish stream ended as it opened: %w", io.EOF)
}

// Publish commits the events atomically, like Client.Publish, and returns one result per event, in order.
// A refused batch (an invalid event, a conflicting id, permission denied, a rate limit, ...) returns the
// same *Error that Client.Publish would, field violations and reason included, and the stream goes on; so
// does an event with a string that is not valid UTF-8, refused before sending (ErrInvalidArgument). A
// batch whose message is over the server's message limit (max_batch_bytes + 1 MiB) cannot be read: the
// server answers the requests before it and ends the stream with codes.ResourceExhausted, which this call,
// every later one and Close return.
// When ctx ends first, Publish stops waiting and returns its error (an *Error that errors.Is matches to
// context.Canceled or context.DeadlineExceeded), but the batch, once sent, may still be committed; a
// request being written while the server holds the stream (flow control, beyond its 1024 unanswered
// requests) finishes writing first. A call whose ctx ended while it waited for its turn to send sends
// nothing, and an answer that came before ctx's end is returned.
// After Close it returns ErrPublisherClosed; after the stream broke, the stream's error.
func (p *Publisher) Publish(ctx context.Context, events ...*nervepb.Event) ([]*nervepb.PublishResult, error) {
	if len(events) == 0 {
		return nil, errNoEvents()
	}
	req := &nervepb.PublishStreamRequest{Events: events}
	if err := checkUTF8(req); err != nil { // sent, it would end the stream
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap(err)
	}
	select {
	case p.sendLock <- struct{}{}:
	case <-ctx.Done():
		return nil, wrap(ctx.Err())
	}
	// the lock and ctx's end may have come together, and a select takes either: a call whose ctx ended
	// while it waited sends nothing
	if err := ctx.Err(); err != nil {
		<-p.sendLock
		return nil, wrap(err)
	}
	p.mu.Lock()
	if err := p.unusableLocked(); err != nil {
		p.mu.Unlock()
		<-p.sendLock
		return nil, err
	}
	p.nextID++
	req.RequestId = p.nextID
	w := &publishWaiter{id: p.nextID, answer: make(chan publishOutcome, 1)}
	p.pending = append(p.pending, w)
	p.mu.Unlock()
	// A failed Send ends the stream (io.EOF: the server ended it; otherwise the client did): either way the
	// receiver stops and answers w with the stream's error.
	_ = p.stream.Send(req)
	<-p.sendLock

	// an answer that already came wins over ctx's end (a select would take either)
	select {
	case out := <-w.answer:
		return out.results, out.err
	default:
	}
	select {
	case out := <-w.answer:
		return out.results, out.err
	case <-ctx.Done():
		return nil, wrap(ctx.Err())
	}
}

// unusableLocked is why no request can be sent now, or nil; p.mu is held.
func (p *Publisher) unusableLocked() error {
	switch {
	case p.closed:
		return ErrPublisherClosed
	case p.ended && p.err != nil:
		return p.err
	case p.ended:
		return fmt.Errorf("nerve: publish stream ended: %w", io.EOF)
	}
	return nil
}

// receive reads answers and hands each to the oldest waiter; answers come in send order.
func (p *Publisher) receive() {
	defer close(p.done)
	for {
		resp, err := p.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			p.end(wrap(err))
			return
		}
		p.mu.Lock()
		if len(p.pending) == 0 || p.pending[0].id != resp.GetRequestId() {
			expected := "none"
			if len(p.pending) > 0 {
				expected = fmt.Sprint(p.pending[0].id)
			}
			p.mu.Unlock()
			p.cancel()
			p.end(fmt.Errorf("nerve: publish stream answered request %d, expected %s", resp.GetRequestId(), expected))
			return
		}
		w := p.pending[0]
		p.pending[0] = nil
		p.pending = p.pending[1:]
		p.mu.Unlock()
		w.answer <- outcomeOf(resp)
	}
}

// outcomeOf turns an answer into a call's return values: a refusal goes through wrap like Publish's status.
func outcomeOf(resp *nervepb.PublishStreamResponse) publishOutcome {
	switch outcome := resp.GetOutcome().(type) {
	case *nervepb.PublishStreamResponse_Published:
		return publishOutcome{results: outcome.Published.GetResults()}
	case *nervepb.PublishStreamResponse_Error:
		refusal := &spb.Status{}
		// the details are the google.rpc.Status a Publish call's trailer would carry; without them (or
		// unreadable) the code and message still stand
		if err := proto.Unmarshal(outcome.Error.GetDetails(), refusal); err != nil {
			refusal = &spb.Status{}
		}
		refusal.Code, refusal.Message = outcome.Error.GetCode(), outcome.Error.GetMessage()
		if codes.Code(refusal.Code) == codes.OK {
			// a refusal is never a success, whatever code it carries; status.ErrorProto would give nil
			refusal.Code = int32(codes.Unknown)
		}
		return publishOutcome{err: wrap(status.ErrorProto(refusal))}
	default:
		return publishOutcome{err: fmt.Errorf("nerve: publish stream answered request %d without an outcome", resp.GetRequestId())}
	}
}

// end records the stream's final error (nil: ended OK) and fails every unanswered call.
func (p *Publisher) end(err error) {
	p.mu.Lock()
	p.ended = true
	p.err = err
	pending := p.pending
	p.pending = nil
	p.mu.Unlock()
	for _, w := range pending {
		failure := err
		if failure == nil {
			failure = fmt.Errorf("nerve: publish stream ended before answering request %d: %w", w.id, io.EOF)
		}
		w.answer <- publishOutcome{err: failure}
	}
}

// Close closes the send side, waits for the answers to every call already sent (those calls return
// them), and ends the stream. It returns the stream's final error, nil when it ended OK. Close again
// returns the same; Publish after Close returns ErrPublisherClosed. It waits as long as the stream lasts
// (the context given to OpenPublisher bounds it), so a server that stops reading holds it; CloseContext
// bounds the wait.
func (p *Publisher) Close() error { return p.CloseContext(context.Background()) }

// CloseContext is Close, waiting only until ctx ends: then it cancels the stream, which ends a Publish held
// in sending by flow control and fails the calls still unanswered with codes.Canceled (their batches,
// once sent, may still be committed), and returns ctx's error (errors.Is matches context.Canceled or
// context.DeadlineExceeded), as every Close after it does.
func (p *Publisher) CloseContext(ctx context.Context) error {
	select {
	case p.sendLock <- struct{}{}: // no Send is in progress while the send side closes
		p.mu.Lock()
		already := p.closed
		p.closed = true
		p.mu.Unlock()
		if !already {
			_ = p.stream.CloseSend()
		}
		<-p.sendLock
		select {
		case <-p.done:
		case <-ctx.Done():
		}
	case <-ctx.Done(): // a Send holds the lock: only the cancel below ends it
		p.mu.Lock()
		p.closed = true // the calls waiting for the lock are refused
		p.mu.Unlock()
	}
	select {
	case <-p.done:
	default: // ctx ended first
		// recorded before the cancel: a Close waiting meanwhile sees it once the stream ends
		p.mu.Lock()
		if p.gaveUp == nil && !p.ended { // a stream that ended meanwhile ended by itself
			p.gaveUp = wrap(ctx.Err())
		}
		p.mu.Unlock()
		p.cancel()
		<-p.done // the receiver ends at once: its call is cancelled
	}
	p.cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.gaveUp != nil {
		return p.gaveUp // Publish returns ErrPublisherClosed
	}
	return p.err
}
