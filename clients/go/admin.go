package nerve

import (
	"context"
	"iter"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// GetEvent returns a stored event by id; source is needed only when several sources used the id. A
// missing event is ErrNotFound.
func (c *Client) GetEvent(ctx context.Context, id, source string) (*nervepb.Event, error) {
	resp, err := c.admin.GetEvent(ctx, &nervepb.GetEventRequest{Id: id, Source: source})
	if err != nil {
		return nil, wrap(err)
	}
	return resp.GetEvent(), nil
}

// ListGroups lists the durable groups with their pending, lag, consumers and dead letters.
func (c *Client) ListGroups(ctx context.Context) ([]*nervepb.GroupInfo, error) {
	resp, err := c.admin.ListGroups(ctx, &nervepb.ListGroupsRequest{})
	if err != nil {
		return nil, wrap(err)
	}
	return resp.GetGroups(), nil
}

// Group returns one group's info, or nil when it does not exist.
func (c *Client) Group(ctx context.Context, name string) (*nervepb.GroupInfo, error) {
	groups, err := c.ListGroups(ctx)
	if err != nil {
		return nil, err
	}
	for _, g := range groups {
		if g.GetName() == name {
			return g, nil
		}
	}
	return nil, nil
}

// DeleteGroup removes a group with its pending deliveries and dead letters; false when it did not exist.
func (c *Client) DeleteGroup(ctx context.Context, group string) (bool, error) {
	resp, err := c.admin.DeleteGroup(ctx, &nervepb.DeleteGroupRequest{Group: group})
	if err != nil {
		return false, wrap(err)
	}
	return resp.GetDeleted(), nil
}

// DeadLetters ranges over a group's dead letters, oldest first, following page tokens (pageSize zero:
// the server's default). A failure is yielded once as the error.
func (c *Client) DeadLetters(ctx context.Context, group string, pageSize uint32) iter.Seq2[*nervepb.DeadLetter, error] {
	return func(yield func(*nervepb.DeadLetter, error) bool) {
		token := ""
		for {
			resp, err := c.admin.ListDeadLetters(ctx, &nervepb.ListDeadLettersRequest{Group: group, PageSize: pageSize, PageToken: token})
			if err != nil {
				yield(nil, wrap(err))
				return
			}
			for _, d := range resp.GetDeadLetters() {
				if !yield(d, nil) {
					return
				}
			}
			if token = resp.GetNextPageToken(); token == "" {
				return
			}
		}
	}
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
	resp, err := c.admin.RedriveDeadLetters(ctx, req)
	if err != nil {
		return 0, wrap(err)
	}
	return resp.GetRedriven(), nil
}

// ListEventTypes lists the event types stored so far, with counts and sequence ranges.
func (c *Client) ListEventTypes(ctx context.Context) ([]*nervepb.EventTypeInfo, error) {
	resp, err := c.admin.ListEventTypes(ctx, &nervepb.ListEventTypesRequest{})
	if err != nil {
		return nil, wrap(err)
	}
	return resp.GetTypes(), nil
}
