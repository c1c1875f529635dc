package nerve

import (
	"context"
	"errors"
	"iter"

	"google.golang.org/grpc/codes"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// GetEvent returns a stored event by id; source is needed only when several sources used the id. A
// missing event is ErrNotFound.
func (c *Client) GetEvent(ctx context.Context, id, source string) (*nervepb.Event, error) {
	resp, err := unary(ctx, c.admin.GetEvent, &nervepb.GetEventRequest{Id: id, Source: source})
	if err != nil {
		return nil, err
	}
	return resp.GetEvent(), nil
}

// ListGroups lists the durable groups the caller may administer, by name, with their pending, lag,
// consumers and dead letters. It reads every page.
func (c *Client) ListGroups(ctx context.Context) ([]*nervepb.GroupInfo, error) {
	var all []*nervepb.GroupInfo
	for g, err := range c.groups(ctx) {
		if err != nil {
			return nil, err
		}
		all = append(all, g)
	}
	return all, nil
}

// Group returns one group's info, or nil when it does not exist.
func (c *Client) Group(ctx context.Context, name string) (*nervepb.GroupInfo, error) {
	resp, err := unary(ctx, c.admin.GetGroup, &nervepb.GetGroupRequest{Group: name})
	switch {
	case err == nil:
		return resp.GetGroup(), nil
	case errors.Is(err, ErrNotFound):
		return nil, nil
	case Code(err) == codes.Unimplemented:
		// a server older than GetGroup (during a rolling upgrade too): look through the list
		return c.listedGroup(ctx, name)
	default:
		return nil, err
	}
}

// listedGroup finds a group by paging through ListGroups; nil when it is not listed.
func (c *Client) listedGroup(ctx context.Context, name string) (*nervepb.GroupInfo, error) {
	for g, err := range c.groups(ctx) {
		if err != nil {
			return nil, err
		}
		if g.GetName() == name {
			return g, nil
		}
	}
	return nil, nil
}

// groups ranges over the groups page by page.
func (c *Client) groups(ctx context.Context) iter.Seq2[*nervepb.GroupInfo, error] {
	return pages(func(token string) ([]*nervepb.GroupInfo, string, error) {
		resp, err := unary(ctx, c.admin.ListGroups, &nervepb.ListGroupsRequest{PageToken: token})
		return resp.GetGroups(), resp.GetNextPageToken(), err
	})
}

// pages ranges over a listing's items, following its page tokens; a failure is yielded once as the
// error.
func pages[T any](page func(token string) ([]T, string, error)) iter.Seq2[T, error] {
	return func(yield func(T, error) bool) {
		token := ""
		for {
			items, next, err := page(token)
			if err != nil {
				var zero T
				yield(zero, wrap(err))
				return
			}
			for _, item := range items {
				if !yield(item, nil) {
					return
				}
			}
			if token = next; token == "" {
				return
			}
		}
	}
}

// DeleteGroup removes a group with its pending deliveries and dead letters; false when it did not exist.
func (c *Client) DeleteGroup(ctx context.Context, group string) (bool, error) {
	resp, err := unary(ctx, c.admin.DeleteGroup, &nervepb.DeleteGroupRequest{Group: group})
	if err != nil {
		return false, err
	}
	return resp.GetDeleted(), nil
}

// DeadLetters ranges over a group's dead letters, oldest first, following page tokens (pageSize zero:
// the server's default). A failure is yielded once as the error.
func (c *Client) DeadLetters(ctx context.Context, group string, pageSize uint32) iter.Seq2[*nervepb.DeadLetter, error] {
	return pages(func(token string) ([]*nervepb.DeadLetter, string, error) {
		resp, err := unary(ctx, c.admin.ListDeadLetters, &nervepb.ListDeadLettersRequest{Group: group, PageSize: pageSize, PageToken: token})
		return resp.GetDeadLetters(), resp.GetNextPageToken(), err
	})
}

// RedriveDeadLetters sends the dead letters with these sequences back to their group, and only to it;
// it returns how many went back.
func (c *Client) RedriveDeadLetters(ctx context.Context, group string, sequences ...uint64) (uint64, error) {
	return c.redrive(ctx, &nervepb.RedriveDeadLettersRequest{Group: group, Sequences: sequences})
}

// RedriveAllDeadLetters sends every dead letter of the group back to it.
func (c *Client) RedriveAllDeadLetters(ctx context.Context, group string) (uint64, error) {
	return c.redrive(ctx, &nervepb.RedriveDeadLettersRequest{Group: group, All: true})
}

func (c *Client) redrive(ctx context.Context, req *nervepb.RedriveDeadLettersRequest) (uint64, error) {
	resp, err := unary(ctx, c.admin.RedriveDeadLetters, req)
	if err != nil {
		return 0, err
	}
	return resp.GetRedriven(), nil
}

// ListEventTypes lists the event types stored so far that the caller may administer, by name, with
// counts and sequence ranges. It reads every page.
func (c *Client) ListEventTypes(ctx context.Context) ([]*nervepb.EventTypeInfo, error) {
	var all []*nervepb.EventTypeInfo
	for t, err := range pages(func(token string) ([]*nervepb.EventTypeInfo, string, error) {
		resp, err := unary(ctx, c.admin.ListEventTypes, &nervepb.ListEventTypesRequest{PageToken: token})
		return resp.GetTypes(), resp.GetNextPageToken(), err
	}) {
		if err != nil {
			return nil, err
		}
		all = append(all, t)
	}
	return all, nil
}
