package nerve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// SubscribeOptions open a subscription. Zero values take the server's defaults.
type SubscribeOptions struct {
	// Types are patterns: "*" matches one segment, ">" the rest. Empty means all types.
	Types []string
	// Group is the durable group; its members share its events. Empty means a private stream.
	Group string
	// Filter runs on the server (see Exact, Prefix, Suffix, All, Any, Not).
	Filter *nervepb.Filter
	// Start is where a private stream, or a new group, starts: StartLatest (default), StartEarliest,
	// StartAfter or StartAt.
	Start *nervepb.StartPosition
	// MaxInFlight is the most unsettled deliveries at once (default 64).
	MaxInFlight uint32
	// AckDeadline is the time to settle a group delivery before it is redelivered (default 30s).
	AckDeadline time.Duration
	// MaxAttempts is how often a group delivers an event before dead-lettering it (default 5).
	MaxAttempts uint32
	// HeartbeatInterval is how often an idle stream gets a heartbeat (default 10s).
	HeartbeatInterval time.Duration
	// HeartbeatTimeout is how long the subscription waits for anything from the server before it takes the
	// connection for dead and ends with ErrUnavailable. Zero: 3 heartbeat intervals (none when an older
	// server does not confirm its interval and HeartbeatInterval is unset); negative: never. Only a whole
	// message counts as something, so it must also cover the transfer of the largest message (an event
	// of up to 1 MiB by default) at the link's rate: raise it on a slow link.
	HeartbeatTimeout time.Duration
}

// Delivery is one event handed to a subscriber. Settle it with Ack, Nack or DeadLetter.
type Delivery struct {
	Event      *nervepb.Event
	DeliveryID string
	// Attempt is 1 on first delivery, then counts redeliveries.
	Attempt uint32
	// AckDeadline is when a group redelivers it unless settled; zero on private streams.
	AckDeadline time.Time
	sub         *Subscription
}

// Sequence is the event's global sequence.
func (d *Delivery) Sequence() uint64 { return d.Event.GetSequence() }

// ReplyTo is the inbox of a request; pass it to Client.Reply.
func (d *Delivery) ReplyTo() string { return d.Event.GetReplyTo() }

// Ack settles the delivery as processed.
func (d *Delivery) Ack() error { return d.sub.Ack(d) }

// Nack settles the delivery as failed; a group redelivers it after delay (zero: at once). On a private
// stream, which has no redelivery, it only frees the delivery's window slot.
func (d *Delivery) Nack(delay time.Duration) error { return d.sub.Nack(delay, d) }

// DeadLetter settles the delivery as failed for good: a group parks it as a dead letter with reason. On a
// private stream, which has no dead letters, it only frees the delivery's window slot.
func (d *Delivery) DeadLetter(reason string) error { return d.sub.DeadLetter(reason, d) }

// Extend moves the ack deadline to by from now.
func (d *Delivery) Extend(by time.Duration) error { return d.sub.Extend(by, d) }

// Message is one message of a subscription stream: exactly one field is set.
type Message struct {
	Delivery  *Delivery
	CaughtUp  *nervepb.CaughtUp
	Heartbeat *nervepb.Heartbeat
}

// closeWait bounds how long Close waits for the server to end the stream after the Close message: ending
// it takes the server one write (the acks) and the hand-back of what is outstanding, milliseconds on a
// healthy server, so a few seconds cover a loaded one, while a caller shutting down is not held for long
// by a server that does not answer.
var closeWait = 5 * time.Second

// Subscription is an open Subscribe stream. Next returns deliveries; Ack, Nack, DeadLetter, Extend,
// Credit and SetFilter steer it; Close ends it. Next is for one goroutine; the rest are safe to call from
// any goroutine.
type Subscription struct {
	stream     nervepb.EventBus_SubscribeClient
	cancel     context.CancelFunc
	subscribed *nervepb.Subscribed
	messages   chan *nervepb.SubscribeResponse
	// rest is what the receiver read past a full messages after a send found the stream ended; it is the
	// receiver's until done closes, then Next's, after messages
	rest    []*nervepb.SubscribeResponse
	ended   chan struct{} // closed when a send found the stream ended
	endOnce sync.Once
	done    chan struct{} // closed when the receiver stopped; err and rest are set before
	err     error
	endSeen atomic.Bool // Next or a send returned err to the application: Close need not tell it again
	closed  atomic.Bool

	// the watchdog: a stream silent for silence (zero: no watchdog) while the receiver waits on the
	// network is cancelled, with dead set first so that the receiver reports it rather than the cancel
	silence  time.Duration
	interval time.Duration // the heartbeat interval in effect; zero: unknown
	dead     atomic.Bool

	closing   chan struct{} // closed when Close starts: from then on the receiver drops what it reads
	closeOnce sync.Once
	closeErr  error // Close's result, set once
	closeWait time.Duration

	sendMu     sync.Mutex // one Send or CloseSend at a time, as gRPC requires
	sendClosed bool       // CloseSend was called; guarded by sendMu

	// written by Next, read from any goroutine
	caughtUp      atomic.Pointer[uint64]
	heartbeats    atomic.Uint64
	lastHeartbeat atomic.Pointer[nervepb.Heartbeat]
}

// Subscribe opens a Subscribe stream and waits for the server to confirm it. ctx bounds the whole stream:
// cancelling it ends the stream at once; Close ends it gracefully.
func (c *Client) Subscribe(ctx context.Context, opts SubscribeOptions) (*Subscription, error) {
	open := &nervepb.SubscriptionOpen{
		Types:       opts.Types,
		Group:       opts.Group,
		Filter:      opts.Filter,
		Start:       opts.Start,
		MaxInFlight: opts.MaxInFlight,
		MaxAttempts: opts.MaxAttempts,
	}
	if opts.AckDeadline > 0 {
		open.AckDeadline = durationpb.New(opts.AckDeadline)
	}
	if opts.HeartbeatInterval > 0 {
		open.HeartbeatInterval = durationpb.New(opts.HeartbeatInterval)
	}
	req := &nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Open{Open: open}}
	if err := checkUTF8(req); err != nil {
		return nil, err
	}
	streamCtx, cancel := context.WithCancel(ctx)
	stream, err := c.bus.Subscribe(streamCtx)
	if err != nil {
		cancel()
		return nil, wrap(err)
	}
	if err := stream.Send(req); err != nil && !errors.Is(err, io.EOF) {
		cancel()
		return nil, wrap(err)
	}
	// io.EOF from Send means the server ended the stream already: Recv returns its status
	first, err := stream.Recv()
	if err != nil {
		cancel()
		if errors.Is(err, io.EOF) {
			return nil, errors.New("nerve: subscribe stream ended before it was confirmed")
		}
		return nil, wrap(err)
	}
	subscribed := first.GetSubscribed()
	if subscribed == nil {
		cancel()
		return nil, fmt.Errorf("nerve: expected subscribed first, got %T", first.GetMessage())
	}
	s := &Subscription{
		stream:     stream,
		cancel:     cancel,
		subscribed: subscribed,
		messages:   make(chan *nervepb.SubscribeResponse, 16),
		ended:      make(chan struct{}),
		done:       make(chan struct{}),
		closing:    make(chan struct{}),
		closeWait:  closeWait,
	}
	s.interval, s.silence = heartbeatTimeout(opts, subscribed)
	go s.receive()
	return s, nil
}

// heartbeatTimeout gives the heartbeat interval in effect (zero: unknown) and the watchdog's timeout
// (zero: none). The interval is the one the server confirms; an older server does not, and then only the
// one asked for is known.
func heartbeatTimeout(opts SubscribeOptions, subscribed *nervepb.Subscribed) (interval, timeout time.Duration) {
	interval = max(opts.HeartbeatInterval, 0)
	if confirmed := subscribed.GetHeartbeatInterval(); confirmed != nil {
		interval = max(confirmed.AsDuration(), 0)
	}
	switch {
	case opts.HeartbeatTimeout < 0:
		return interval, 0
	case opts.HeartbeatTimeout > 0:
		return interval, opts.HeartbeatTimeout
	default:
		return interval, 3 * interval
	}
}

// receive reads the stream into s.messages, so that Next can give up on its own context without
// cancelling the stream.
func (s *Subscription) receive() {
	defer close(s.done)
	var watchdog *time.Timer
	if s.silence > 0 {
		watchdog = time.AfterFunc(s.silence, func() {
			s.dead.Store(true)
			s.cancel()
		})
		defer watchdog.Stop()
	}
	for {
		// the watchdog runs only while Recv waits on the network, not while the application does not
		// read (below, waiting for room in messages)
		if watchdog != nil {
			watchdog.Reset(s.silence)
		}
		m, err := s.stream.Recv()
		if watchdog != nil {
			watchdog.Stop()
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.err = s.failure(err)
			}
			return
		}
		select {
		case <-s.closing:
			// Close waits for the end of the stream and nobody reads this any more: drop it (the server
			// hands back what is outstanding when the stream ends), and keep reading, as a server held
			// by flow control would not get to the Close message
			continue
		default:
		}
		if len(s.rest) > 0 { // keep the order: once one message went to rest, the others follow it
			s.rest = append(s.rest, m)
			continue
		}
		select {
		case s.messages <- m:
		case <-s.ended:
			// a send waits for the stream's status, which Recv gives only after the messages still
			// unread: keep them for Next rather than wait for it to make room
			s.rest = append(s.rest, m)
		case <-s.closing: // dropped, as above
		case <-s.stream.Context().Done():
			// cancelled while waiting for room: the status Recv would have given, not a clean end
			s.err = s.failure(status.FromContextError(s.stream.Context().Err()).Err())
			return
		}
	}
}

// failure is the stream's error for err, the error Recv gave: the watchdog's when it cancelled the stream.
func (s *Subscription) failure(err error) error {
	if !s.dead.Load() {
		return wrap(err)
	}
	due := ""
	if s.interval > 0 {
		due = fmt.Sprintf(" (heartbeats are due every %s)", s.interval)
	}
	return &Error{Code: codes.Unavailable, Message: fmt.Sprintf(
		"no message from the server for %s%s: the connection is taken for dead; subscribe again", s.silence, due)}
}

// Subscribed is the server's confirmation: subscription id, group, the head sequence at open and the heartbeat
// interval in effect (unset by older servers).
func (s *Subscription) Subscribed() *nervepb.Subscribed { return s.subscribed }

// CaughtUp reports the caught-up marker's sequence once it was read: every stored match was delivered
// before it, the rest is live.
func (s *Subscription) CaughtUp() (uint64, bool) {
	seq := s.caughtUp.Load()
	if seq == nil {
		return 0, false
	}
	return *seq, true
}

// Heartbeats counts the heartbeats read so far; LastHeartbeat is the latest (nil before the first).
func (s *Subscription) Heartbeats() uint64 { return s.heartbeats.Load() }

// LastHeartbeat is the latest heartbeat read (nil before the first).
func (s *Subscription) LastHeartbeat() *nervepb.Heartbeat { return s.lastHeartbeat.Load() }

// NextMessage returns the next message of any kind. A message already received comes first, even when
// ctx has ended (an ended ctx takes what is queued without waiting). At the end of the stream it returns
// io.EOF (ended cleanly), ErrClosed (closed by this side: at once, also while Close waits) or the stream's
// *Error; when ctx ends first, ctx's error as an *Error (errors.Is matches context.Canceled or
// context.DeadlineExceeded), and the stream stays usable.
func (s *Subscription) NextMessage(ctx context.Context) (Message, error) {
	for {
		if s.closed.Load() { // what is still buffered goes back to the server with the end of the stream
			return Message{}, ErrClosed
		}
		m, ended := s.queued()
		if m == nil && ended {
			return Message{}, s.endErr()
		}
		if m == nil {
			// nothing queued: wait. (A select picks at random among the cases ready, so what is queued and
			// the end of the stream are taken above, before ctx is looked at.)
			select {
			case m = <-s.messages:
			case <-ctx.Done():
				return Message{}, wrap(ctx.Err())
			case <-s.closing:
				return Message{}, ErrClosed
			case <-s.done:
				if m = s.unread(); m == nil {
					return Message{}, s.endErr()
				}
			}
		}
		switch msg := m.GetMessage().(type) {
		case *nervepb.SubscribeResponse_Delivery:
			d := msg.Delivery
			out := &Delivery{Event: d.GetEvent(), DeliveryID: d.GetDeliveryId(), Attempt: d.GetAttempt(), sub: s}
			if d.GetAckDeadline() != nil {
				out.AckDeadline = d.GetAckDeadline().AsTime()
			}
			return Message{Delivery: out}, nil
		case *nervepb.SubscribeResponse_CaughtUp:
			seq := msg.CaughtUp.GetSequence()
			s.caughtUp.Store(&seq)
			return Message{CaughtUp: msg.CaughtUp}, nil
		case *nervepb.SubscribeResponse_Heartbeat:
			s.lastHeartbeat.Store(msg.Heartbeat) // first, so that LastHeartbeat is never older than the count
			s.heartbeats.Add(1)
			return Message{Heartbeat: msg.Heartbeat}, nil
		default:
			continue // a kind this client does not know (a newer server): skip it
		}
	}
}

// Next returns the next delivery, reading past heartbeats and recording the caught-up marker. What is
// queued comes first, even when ctx has ended; errors are those of NextMessage.
func (s *Subscription) Next(ctx context.Context) (*Delivery, error) {
	for {
		m, err := s.NextMessage(ctx)
		if err != nil {
			return nil, err
		}
		if m.Delivery != nil {
			return m.Delivery, nil
		}
	}
}

// UntilCaughtUp reads until the caught-up marker and returns the deliveries before it, unsettled. With a
// window of MaxInFlight deliveries this suits backlogs smaller than the window; settle as you go otherwise.
func (s *Subscription) UntilCaughtUp(ctx context.Context) ([]*Delivery, error) {
	var out []*Delivery
	for s.caughtUp.Load() == nil {
		m, err := s.NextMessage(ctx)
		if err != nil {
			return out, err
		}
		if m.Delivery != nil {
			out = append(out, m.Delivery)
		}
	}
	return out, nil
}

// queued returns the next message received, or nil when none is queued now, without waiting; ended is
// true once the stream ended and nothing received is left (the end is then endErr's to tell).
func (s *Subscription) queued() (m *nervepb.SubscribeResponse, ended bool) {
	select {
	case m = <-s.messages:
		return m, false
	default:
	}
	select {
	case <-s.done:
		m = s.unread()
		return m, m == nil
	default:
		return nil, false
	}
}

// unread returns the next message received before the stream ended, or nil; only once done is closed.
func (s *Subscription) unread() *nervepb.SubscribeResponse {
	select {
	case m := <-s.messages:
		return m
	default:
	}
	if len(s.rest) == 0 {
		return nil
	}
	m := s.rest[0]
	s.rest[0] = nil
	s.rest = s.rest[1:]
	return m
}

// endErr is what reading and sending return once the stream ended (done is closed): it records that the
// application was told the stream's error, so that Close does not return it again.
func (s *Subscription) endErr() error {
	switch {
	case s.closed.Load():
		return ErrClosed
	case s.err != nil:
		// after the check of closed: a Close that starts meanwhile returns the error too, rather than
		// neither telling it
		s.endSeen.Store(true)
		return s.err
	default:
		return io.EOF
	}
}

// unseenEnd is the error the stream ended with (nil: OK), unless Next or a send already returned it; done
// is closed.
func (s *Subscription) unseenEnd() error {
	if s.endSeen.Load() {
		return nil
	}
	return s.err
}

func ids(ds []*Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.DeliveryID
	}
	return out
}

// Ack settles deliveries as processed; none: nothing is sent, and it returns nil.
func (s *Subscription) Ack(ds ...*Delivery) error {
	return s.AckIDs(ids(ds)...)
}

// AckIDs settles deliveries, named by delivery id, as processed; none: nothing is sent, and it returns
// nil.
func (s *Subscription) AckIDs(deliveryIDs ...string) error {
	if len(deliveryIDs) == 0 {
		return nil
	}
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Ack{Ack: &nervepb.Ack{DeliveryIds: deliveryIDs}}})
}

// Nack settles deliveries as failed: a group redelivers each after delay (zero: at once); on a private
// stream, which has no redelivery, a nack only frees the delivery's window slot. A negative delay is
// ErrInvalidArgument, returned without sending, with or without deliveries; the server cuts one above its
// max_ack_deadline to it. No deliveries (and a valid delay): nothing is sent, and it returns nil.
func (s *Subscription) Nack(delay time.Duration, ds ...*Delivery) error {
	if delay < 0 { // the server would end the whole stream for it
		return invalidArgument("nack.retry_delay", "must be a non-negative duration")
	}
	if len(ds) == 0 {
		return nil
	}
	nack := &nervepb.Nack{DeliveryIds: ids(ds), RetryDelay: durationpb.New(delay)}
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Nack{Nack: nack}})
}

// DeadLetter settles deliveries as failed for good: a group dead-letters them now, with reason; on a
// private stream, which has no dead letters, it only frees their window slots. Invalid UTF-8 in reason
// is replaced by U+FFFD. No deliveries: nothing is sent, and it returns nil.
func (s *Subscription) DeadLetter(reason string, ds ...*Delivery) error {
	if len(ds) == 0 { // any reason is valid (see below): there is nothing to check first
		return nil
	}
	// a reason is what a failing consumer had at hand (bad input's text, say): the server takes any (its
	// first 1 KiB), so it is mended here rather than refused, which would leave the deliveries unsettled
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	nack := &nervepb.Nack{DeliveryIds: ids(ds), DeadLetter: true, Reason: reason}
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Nack{Nack: nack}})
}

// Extend moves the ack deadline of deliveries to by from now. A by that is not positive is
// ErrInvalidArgument, returned without sending, with or without deliveries; the server cuts one above its
// max_ack_deadline to it. No deliveries (and a valid by): nothing is sent, and it returns nil.
func (s *Subscription) Extend(by time.Duration, ds ...*Delivery) error {
	if by <= 0 { // the server would end the whole stream for it
		return invalidArgument("extend.extension", "must be positive")
	}
	if len(ds) == 0 {
		return nil
	}
	extend := &nervepb.ExtendDeadline{DeliveryIds: ids(ds), Extension: durationpb.New(by)}
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Extend{Extend: extend}})
}

// Credit widens the window: the server may send credits more deliveries.
func (s *Subscription) Credit(credits uint32) error {
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Credit{Credit: &nervepb.Credit{Credits: credits}}})
}

// SetFilter replaces the server-side filter (for a group: the group's filter); nil clears it.
func (s *Subscription) SetFilter(filter *nervepb.Filter) error {
	return s.send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_SetFilter{SetFilter: &nervepb.SetFilter{Filter: filter}}})
}

// sendFoundEnd, when set (only by tests, through export_test.go), runs in a send whose Send found the
// stream ended (io.EOF), before it lets the receiver know: a test holds the send there.
var sendFoundEnd atomic.Pointer[func()]

// errHalfClosed is what sending returns after CloseSend.
var errHalfClosed = fmt.Errorf("%w: CloseSend half-closed it, nothing more can be sent", ErrClosed)

func (s *Subscription) send(req *nervepb.SubscribeRequest) error {
	if err := checkUTF8(req); err != nil {
		return err
	}
	if s.closed.Load() {
		return ErrClosed
	}
	s.sendMu.Lock()
	if s.closed.Load() { // Close came first: its message ends what the server reads, so this would be lost
		s.sendMu.Unlock()
		return ErrClosed
	}
	if s.sendClosed { // grpc-go would end the whole call for a Send after CloseSend
		s.sendMu.Unlock()
		return errHalfClosed
	}
	err := s.stream.Send(req)
	s.sendMu.Unlock()
	switch {
	case err == nil:
		return nil
	case s.closed.Load(): // Close cancelled the stream under this send (it was held by flow control)
		return ErrClosed
	case !errors.Is(err, io.EOF):
		return wrap(err)
	}
	// io.EOF: the stream ended and its status comes from the receiver, which must not wait for room in
	// messages to read it (Next may be called from this very goroutine, after this returns)
	if hook := sendFoundEnd.Load(); hook != nil {
		(*hook)()
	}
	s.endOnce.Do(func() { close(s.ended) })
	<-s.done
	if err := s.endErr(); !errors.Is(err, io.EOF) {
		return err
	}
	return fmt.Errorf("nerve: subscription stream ended: %w", io.EOF)
}

// CloseSend half-closes: nothing more can be sent (settling deliveries, Credit and SetFilter return
// ErrClosed; settling none still returns nil, as it sends nothing), deliveries keep coming until Close
// (which then cancels the stream at once, as it can no longer ask the server to end it).
func (s *Subscription) CloseSend() error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.sendClosed = true
	return s.stream.CloseSend()
}

// Close ends the stream gracefully: it sends a Close message, so that the server saves every settlement
// sent before it, hands the unsettled deliveries back (as an attempt) and ends the stream; it waits for that
// end, at most 5s, dropping deliveries that arrive meanwhile, then cancels the call. It returns nil once the
// server ended the stream with OK; else ErrDeadlineExceeded (no end in time) or the stream's *Error, and
// settlements sent just before may come back. On a stream still open after CloseSend there is nothing to
// send the message on: it cancels at once and returns nil. A stream that had already ended (before Close,
// or under its message) leaves it only the cancel: it returns the error the stream ended with, whenever
// that end came, unless Next or a send already returned it (nil then, as for an end with OK). Safe from any
// goroutine; later calls return the same.
func (s *Subscription) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.closeGracefully() })
	return s.closeErr
}

func (s *Subscription) closeGracefully() error {
	s.closed.Store(true) // first: a settle that did not take sendMu before now is refused, not sent after
	close(s.closing)
	defer s.cancel()
	select {
	case <-s.done:
		// the stream had ended: nothing reads a Close message, and how it ended is told here unless
		// reading or sending already told it
		return s.unseenEnd()
	default:
	}
	// the bound covers the send too: a server that reads nothing holds it (and any settle under sendMu) by
	// flow control, and only the cancel ends that
	var timedOut atomic.Bool
	timer := time.AfterFunc(s.closeWait, func() {
		timedOut.Store(true)
		s.cancel()
	})
	defer timer.Stop()
	sent := false
	s.sendMu.Lock()
	halfClosed := s.sendClosed // the server reads nothing more; it ends the stream only on a cancel
	if !halfClosed {
		sent = s.stream.Send(&nervepb.SubscribeRequest{Action: &nervepb.SubscribeRequest_Close{Close: &nervepb.Close{}}}) == nil
	}
	s.sendMu.Unlock()
	if !sent {
		// half-closed, or the stream ended under this send: nothing will answer a Close
		s.cancel()
	}
	<-s.done
	switch {
	case timedOut.Load():
		return &Error{Code: codes.DeadlineExceeded, Message: fmt.Sprintf(
			"the server did not end the subscription within %s of Close; settlements sent just before may come back", s.closeWait)}
	case halfClosed:
		return nil
	case !sent:
		// io.EOF: it ended before the message went out, with the status the cancel above leaves as it was
		return s.unseenEnd()
	default:
		return s.err // nil when the server ended the stream with OK, after the settlements before the Close
	}
}
