package nerve

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"sort"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nerve-bus/nerve/clients/go/nervepb"
)

// Priority levels inside durable groups.
const (
	PriorityUnspecified = nervepb.Priority_PRIORITY_UNSPECIFIED
	PriorityLow         = nervepb.Priority_PRIORITY_LOW
	PriorityNormal      = nervepb.Priority_PRIORITY_NORMAL
	PriorityHigh        = nervepb.Priority_PRIORITY_HIGH
	PriorityCritical    = nervepb.Priority_PRIORITY_CRITICAL
)

// EventBuilder builds a CloudEvents 1.0 event (spec version "1.0"). Start with NewEvent, chain setters,
// finish with Build (or MustBuild). The id defaults to a UUIDv7 (time-ordered, random after the time).
type EventBuilder struct {
	ev   *nervepb.Event
	errs []error
}

// NewEvent starts an event of the given source ("//planner/eu-1") and type ("workflow.task.created.v1").
func NewEvent(source, eventType string) *EventBuilder {
	return &EventBuilder{ev: &nervepb.Event{Source: source, Type: eventType, SpecVersion: "1.0"}}
}

// ID sets the event id; (source, id) is the idempotency key.
func (b *EventBuilder) ID(id string) *EventBuilder { b.ev.Id = id; return b }

// Subject sets the subject.
func (b *EventBuilder) Subject(subject string) *EventBuilder { b.ev.Subject = subject; return b }

// Text sets text data.
func (b *EventBuilder) Text(text string) *EventBuilder {
	b.ev.Data = &nervepb.Event_TextData{TextData: text}
	return b
}

// Bytes sets binary data.
func (b *EventBuilder) Bytes(data []byte) *EventBuilder {
	b.ev.Data = &nervepb.Event_BinaryData{BinaryData: data}
	return b
}

// JSON sets v, marshaled to JSON, as text data with content type application/json.
func (b *EventBuilder) JSON(v any) *EventBuilder {
	data, err := json.Marshal(v)
	if err != nil {
		b.errs = append(b.errs, fmt.Errorf("event data: %w", err))
		return b
	}
	b.ev.Data = &nervepb.Event_TextData{TextData: string(data)}
	b.ev.DataContentType = "application/json"
	return b
}

// Proto packs m into an Any as the event's proto data.
func (b *EventBuilder) Proto(m proto.Message) *EventBuilder {
	packed, err := anypb.New(m)
	if err != nil {
		b.errs = append(b.errs, fmt.Errorf("event data: %w", err))
		return b
	}
	b.ev.Data = &nervepb.Event_ProtoData{ProtoData: packed}
	return b
}

// ContentType sets the data content type.
func (b *EventBuilder) ContentType(contentType string) *EventBuilder {
	b.ev.DataContentType = contentType
	return b
}

// DataSchema sets the data schema URI.
func (b *EventBuilder) DataSchema(uri string) *EventBuilder { b.ev.DataSchema = uri; return b }

// Time sets when the occurrence happened (the server uses the commit time when unset).
func (b *EventBuilder) Time(t time.Time) *EventBuilder { b.ev.Time = timestamppb.New(t); return b }

// Priority sets the delivery priority inside groups.
func (b *EventBuilder) Priority(p nervepb.Priority) *EventBuilder { b.ev.Priority = p; return b }

// CorrelationID ties a conversation together.
func (b *EventBuilder) CorrelationID(id string) *EventBuilder { b.ev.CorrelationId = id; return b }

// CausationID names the event that caused this one.
func (b *EventBuilder) CausationID(id string) *EventBuilder { b.ev.CausationId = id; return b }

// Traceparent sets the W3C trace context.
func (b *EventBuilder) Traceparent(tp string) *EventBuilder { b.ev.Traceparent = tp; return b }

// Extension sets a CloudEvents extension attribute. value is a string, bool, an integer that fits in 32
// bits, []byte, time.Time, *url.URL (a URI) or a *nervepb.ExtensionValue.
func (b *EventBuilder) Extension(name string, value any) *EventBuilder {
	v, err := extensionValue(value)
	if err != nil {
		b.errs = append(b.errs, fmt.Errorf("extension %q: %w", name, err))
		return b
	}
	if b.ev.Extensions == nil {
		b.ev.Extensions = map[string]*nervepb.ExtensionValue{}
	}
	b.ev.Extensions[name] = v
	return b
}

// Build returns the event, or every error the setters met, joined (errors.Join).
func (b *EventBuilder) Build() (*nervepb.Event, error) {
	if len(b.errs) > 0 {
		return nil, errors.Join(b.errs...)
	}
	ev := proto.Clone(b.ev).(*nervepb.Event)
	if ev.Id == "" {
		ev.Id = newUUID()
	}
	return ev, nil
}

// MustBuild is Build that panics on error (for events built from constants).
func (b *EventBuilder) MustBuild() *nervepb.Event {
	ev, err := b.Build()
	if err != nil {
		panic(err)
	}
	return ev
}

func extensionValue(value any) (*nervepb.ExtensionValue, error) {
	integer := func(n int64) (*nervepb.ExtensionValue, error) {
		if n < math.MinInt32 || n > math.MaxInt32 {
			return nil, fmt.Errorf("integer %d does not fit in 32 bits (CloudEvents Integer)", n)
		}
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_IntegerValue{IntegerValue: int32(n)}}, nil
	}
	switch v := value.(type) {
	case *nervepb.ExtensionValue:
		return v, nil
	case string:
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_StringValue{StringValue: v}}, nil
	case bool:
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_BoolValue{BoolValue: v}}, nil
	case int:
		return integer(int64(v))
	case int32:
		return integer(int64(v))
	case int64:
		return integer(v)
	case []byte:
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_BytesValue{BytesValue: v}}, nil
	case time.Time:
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_TimestampValue{TimestampValue: timestamppb.New(v)}}, nil
	case *url.URL:
		return &nervepb.ExtensionValue{Value: &nervepb.ExtensionValue_UriValue{UriValue: v.String()}}, nil
	default:
		return nil, fmt.Errorf("unsupported type %T", value)
	}
}

// Extensions returns the event's extension attributes as Go values (string, bool, int32, []byte,
// time.Time; URIs and URI references as string).
func Extensions(ev *nervepb.Event) map[string]any {
	out := make(map[string]any, len(ev.GetExtensions()))
	names := make([]string, 0, len(ev.GetExtensions()))
	for name := range ev.GetExtensions() {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		switch v := ev.GetExtensions()[name].GetValue().(type) {
		case *nervepb.ExtensionValue_StringValue:
			out[name] = v.StringValue
		case *nervepb.ExtensionValue_BoolValue:
			out[name] = v.BoolValue
		case *nervepb.ExtensionValue_IntegerValue:
			out[name] = v.IntegerValue
		case *nervepb.ExtensionValue_BytesValue:
			out[name] = v.BytesValue
		case *nervepb.ExtensionValue_UriValue:
			out[name] = v.UriValue
		case *nervepb.ExtensionValue_UriRefValue:
			out[name] = v.UriRefValue
		case *nervepb.ExtensionValue_TimestampValue:
			out[name] = v.TimestampValue.AsTime()
		}
	}
	return out
}

// UnmarshalData decodes the event's JSON data (text or binary) into v.
func UnmarshalData(ev *nervepb.Event, v any) error {
	switch d := ev.GetData().(type) {
	case *nervepb.Event_TextData:
		return json.Unmarshal([]byte(d.TextData), v)
	case *nervepb.Event_BinaryData:
		return json.Unmarshal(d.BinaryData, v)
	default:
		return fmt.Errorf("nerve: event %q carries no JSON data", ev.GetId())
	}
}

// StartLatest starts with events committed after the subscription opens (the default).
func StartLatest() *nervepb.StartPosition {
	return &nervepb.StartPosition{Position: &nervepb.StartPosition_Latest{Latest: &emptypb.Empty{}}}
}

// StartEarliest starts with all stored history, then goes live.
func StartEarliest() *nervepb.StartPosition {
	return &nervepb.StartPosition{Position: &nervepb.StartPosition_Earliest{Earliest: &emptypb.Empty{}}}
}

// StartAfter continues after sequence (the last one processed), with no gap and no duplicate.
func StartAfter(sequence uint64) *nervepb.StartPosition {
	return &nervepb.StartPosition{Position: &nervepb.StartPosition_AfterSequence{AfterSequence: sequence}}
}

// StartAt starts with events recorded at or after t.
func StartAt(t time.Time) *nervepb.StartPosition {
	return &nervepb.StartPosition{Position: &nervepb.StartPosition_Time{Time: timestamppb.New(t)}}
}

// Exact matches events whose every named attribute (or extension) equals its value.
func Exact(attributes map[string]string) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_Exact{Exact: &nervepb.AttributeValues{Attributes: attributes}}}
}

// Prefix matches events whose every named attribute starts with its value.
func Prefix(attributes map[string]string) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_Prefix{Prefix: &nervepb.AttributeValues{Attributes: attributes}}}
}

// Suffix matches events whose every named attribute ends with its value.
func Suffix(attributes map[string]string) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_Suffix{Suffix: &nervepb.AttributeValues{Attributes: attributes}}}
}

// All matches when every nested filter matches.
func All(filters ...*nervepb.Filter) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_All{All: &nervepb.FilterList{Filters: filters}}}
}

// Any matches when at least one nested filter matches.
func Any(filters ...*nervepb.Filter) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_Any{Any: &nervepb.FilterList{Filters: filters}}}
}

// Not matches when the nested filter does not.
func Not(filter *nervepb.Filter) *nervepb.Filter {
	return &nervepb.Filter{Filter: &nervepb.Filter_Negate{Negate: filter}}
}

// newUUID returns a UUIDv7 (RFC 9562): the Unix time in milliseconds, then random bits. Ids that grow
// with time keep the server's key index appending; random ones made each commit rewrite about one page
// of it per event (the repository's docs/benchmarks.md, cause 4).
func newUUID() string {
	var u [16]byte
	if _, err := rand.Read(u[6:]); err != nil {
		panic(err)
	}
	ms := uint64(time.Now().UnixMilli())
	for i := 0; i < 6; i++ {
		u[i] = byte(ms >> (40 - 8*i))
	}
	u[6] = (u[6] & 0x0f) | 0x70
	u[8] = (u[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
}
