package nerve

import (
	"context"
	"errors"
	"io"
	"iter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// ReplayOptions select stored history. Zero values mean no bound.
type ReplayOptions struct {
	// Types are patterns; empty means all types.
	Types         []string
	Source        string
	Subject       string
	CorrelationID string
	// StartTime and EndTime bound the recorded time: [StartTime, EndTime).
	StartTime time.Time
	EndTime   time.Time
	// AfterSequence and UntilSequence bound the sequence: (AfterSequence, UntilSequence].
	AfterSequence uint64
	UntilSequence uint64
	// Limit is the most events to return; zero means all.
	Limit uint32
	// PageSize is events per page (default 100, at most 1000).
	PageSize uint32
	// ResumeToken continues an earlier replay (Replay.ResumeToken); it overrides AfterSequence.
	ResumeToken string
	// MaxResumes is how often in a row a replay whose stream breaks with Unavailable, or ends with
	// ErrTokenExpired, reconnects from its last resume token; zero means 3, negative means never. A second
	// ErrTokenExpired with no page between ends the replay sooner: its credentials gave no fresh token.
	MaxResumes int
}

// Replay is stored history in sequence order, read page by page. Call Next (or NextPage) until io.EOF, or
// range over All. After each page ResumeToken continues right after it. A stream that breaks with
// Unavailable, or that the server ends with ErrTokenExpired when the token it was opened with expires, is
// reopened from the last token, so no event is skipped or repeated: with per-RPC credentials that refresh
// (an oauth2.ReuseTokenSource, say) the new stream carries a fresh token; a token that stays expired fails
// at the first reopening it is refused on. A stream that breaks after the last page (EndOfHistory, or the
// Limit reached) ends the replay cleanly: nothing was left to read.
type Replay struct {
	ctx          context.Context
	bus          nervepb.EventBusClient
	req          *nervepb.ReplayRequest
	maxResumes   int
	limit        uint64 // the Limit asked for, across reconnects
	stream       nervepb.EventBus_ReplayClient
	cancel       context.CancelFunc
	page         []*nervepb.Event
	resumeToken  string
	endOfHistory bool
	count        uint64
	failures     int
	// expired: a failure since the last page was ErrTokenExpired
	expired bool
	err     error
}

// Replay starts a replay; nothing is sent until the first Next. ctx bounds the whole replay: when it ends
// while a broken stream waits to be reopened, Next returns its error (errors.Is matches context.Canceled or
// context.DeadlineExceeded) rather than the break's. Options with a string that is not valid UTF-8 send
// nothing: the first Next returns ErrInvalidArgument naming the field ("types[0]"), as Client.Publish does.
func (c *Client) Replay(ctx context.Context, opts ReplayOptions) *Replay {
	req := &nervepb.ReplayRequest{
		Types:         opts.Types,
		Source:        opts.Source,
		Subject:       opts.Subject,
		CorrelationId: opts.CorrelationID,
		AfterSequence: opts.AfterSequence,
		UntilSequence: opts.UntilSequence,
		Limit:         opts.Limit,
		PageSize:      opts.PageSize,
		ResumeToken:   opts.ResumeToken,
	}
	if !opts.StartTime.IsZero() {
		req.StartTime = timestamppb.New(opts.StartTime)
	}
	if !opts.EndTime.IsZero() {
		req.EndTime = timestamppb.New(opts.EndTime)
	}
	maxResumes := opts.MaxResumes
	if maxResumes == 0 {
		maxResumes = 3
	}
	return &Replay{
		ctx: ctx, bus: c.bus, req: req, maxResumes: maxResumes, limit: uint64(opts.Limit), resumeToken: opts.ResumeToken,
		err: checkUTF8(req), // a reopening changes only the server's resume token and the limit
	}
}

// ResumeToken continues after the last page received (before the first page, the ResumeToken the
// replay was opened with).
func (r *Replay) ResumeToken() string { return r.resumeToken }

// EndOfHistory is true once the server said no more stored events match.
func (r *Replay) EndOfHistory() bool { return r.endOfHistory }

// Count is the number of events received so far.
func (r *Replay) Count() uint64 { return r.count }

// NextPage returns the next page as the server sent it, io.EOF at the end, or the replay's *Error.
func (r *Replay) NextPage() (*nervepb.ReplayResponse, error) {
	if r.err != nil {
		return nil, r.err
	}
	for {
		if r.stream == nil {
			ctx, cancel := context.WithCancel(r.ctx)
			stream, err := r.bus.Replay(ctx, r.req)
			if err != nil {
				cancel()
				if err = r.retry(err); err == nil {
					continue
				}
				return nil, r.fail(err)
			}
			r.stream, r.cancel = stream, cancel
		}
		page, err := r.stream.Recv()
		if err == nil {
			r.failures, r.expired = 0, false
			r.resumeToken = page.GetResumeToken()
			r.endOfHistory = page.GetEndOfHistory()
			r.count += uint64(len(page.GetEvents()))
			return page, nil
		}
		r.cancel()
		r.stream = nil
		// after the last page only the server's OK was missing
		if errors.Is(err, io.EOF) || r.endOfHistory || (r.limit > 0 && r.count >= r.limit) {
			r.err = io.EOF
			return nil, io.EOF
		}
		if err = r.retry(err); err == nil {
			continue
		}
		return nil, r.fail(err)
	}
}

// retry prepares a reconnect from the last token after an Unavailable error or an expired token (the new
// call asks the per-RPC credentials again), backing off (resumeBackoff), and returns nil; else the error the
// replay ends with: err, or the context's when it ends during the backoff. An expired token right after
// another, with no page between, is not retried: the credentials gave the same or another expired token.
func (r *Replay) retry(err error) error {
	err = wrap(err)
	expired := errors.Is(err, ErrTokenExpired)
	resumable := Code(err) == codes.Unavailable || (expired && !r.expired)
	if !resumable || r.failures >= r.maxResumes {
		return err
	}
	r.failures++
	r.expired = r.expired || expired
	select {
	case <-time.After(resumeBackoff(r.failures)):
	case <-r.ctx.Done():
		// the caller gave up, not the server: errors.Is matches the context's error (context.Canceled)
		return wrap(r.ctx.Err())
	}
	req := proto.Clone(r.req).(*nervepb.ReplayRequest)
	req.ResumeToken = r.resumeToken
	if r.limit > 0 {
		req.Limit = uint32(r.limit - r.count)
	}
	r.req = req
	return nil
}

func (r *Replay) fail(err error) error {
	r.err = wrap(err)
	return r.err
}

// Next returns the next event, io.EOF at the end, or the replay's *Error.
func (r *Replay) Next() (*nervepb.Event, error) {
	for len(r.page) == 0 {
		page, err := r.NextPage()
		if err != nil {
			return nil, err
		}
		r.page = page.GetEvents()
	}
	ev := r.page[0]
	r.page = r.page[1:]
	return ev, nil
}

// All ranges over the events; a failure is yielded once as the error, io.EOF ends the range.
func (r *Replay) All() iter.Seq2[*nervepb.Event, error] {
	return func(yield func(*nervepb.Event, error) bool) {
		defer r.Close()
		for {
			ev, err := r.Next()
			if errors.Is(err, io.EOF) {
				return
			}
			if !yield(ev, err) || err != nil {
				return
			}
		}
	}
}

// Close stops the replay early.
func (r *Replay) Close() {
	if r.cancel != nil {
		r.cancel()
	}
	r.stream = nil
	if r.err == nil {
		r.err = io.EOF
	}
}

// maxResumeBackoff bounds the wait before a reopening: a server back after a restart is used within it,
// whatever MaxResumes allows.
const maxResumeBackoff = 5 * time.Second

// resumeBackoff is the wait before the n-th reopening in a row: 0.2 s, doubling, at most
// maxResumeBackoff.
func resumeBackoff(n int) time.Duration {
	if n >= 6 {
		return maxResumeBackoff
	}
	return min(time.Duration(100<<n)*time.Millisecond, maxResumeBackoff)
}
