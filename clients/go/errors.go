package nerve

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// FieldViolation is one invalid field of a request, from the google.rpc.BadRequest detail
// (for example "events[0].type").
type FieldViolation struct {
	Field       string
	Description string
}

// Error is a failed call: its gRPC code and message plus the rich details the server sent.
//
// Match kinds with errors.Is against the sentinels (errors.Is(err, nerve.ErrAlreadyExists)) or read
// Code; status.Code(err) works too.
type Error struct {
	Code    codes.Code
	Message string
	// FieldViolations names each bad field (google.rpc.BadRequest).
	FieldViolations []FieldViolation
	// Reason is the google.rpc.ErrorInfo reason, e.g. "NO_RESPONDERS"; empty when none was sent.
	Reason string
	// Metadata is the google.rpc.ErrorInfo metadata.
	Metadata map[string]string
	status   *status.Status
	cause    error // the context error the call gave up on; nil for an RPC error
	sentinel bool
}

// Sentinels for errors.Is.
var (
	ErrInvalidArgument    = &Error{Code: codes.InvalidArgument, sentinel: true}
	ErrResourceExhausted  = &Error{Code: codes.ResourceExhausted, sentinel: true}
	ErrAlreadyExists      = &Error{Code: codes.AlreadyExists, sentinel: true}
	ErrNotFound           = &Error{Code: codes.NotFound, sentinel: true}
	ErrFailedPrecondition = &Error{Code: codes.FailedPrecondition, sentinel: true}
	// ErrOutOfRange: a position past what is stored yet, e.g. a subscription's start after the head.
	ErrOutOfRange = &Error{Code: codes.OutOfRange, sentinel: true}
	// ErrNoResponders: a request no connected subscriber could receive (FailedPrecondition, NO_RESPONDERS).
	ErrNoResponders     = &Error{Code: codes.FailedPrecondition, Reason: "NO_RESPONDERS", sentinel: true}
	ErrDeadlineExceeded = &Error{Code: codes.DeadlineExceeded, sentinel: true}
	ErrUnavailable      = &Error{Code: codes.Unavailable, sentinel: true}
	ErrPermissionDenied = &Error{Code: codes.PermissionDenied, sentinel: true}
	ErrUnauthenticated  = &Error{Code: codes.Unauthenticated, sentinel: true}
	// ErrTokenExpired: the bearer token a call or stream was made with expired (Unauthenticated, TOKEN_EXPIRED).
	ErrTokenExpired = &Error{Code: codes.Unauthenticated, Reason: "TOKEN_EXPIRED", sentinel: true}
)

// ErrClosed is returned by a Subscription that this side closed (settling a delivery after CloseSend too).
var ErrClosed = errors.New("nerve: subscription closed")

func (e *Error) Error() string {
	if e.sentinel {
		if e.Reason != "" {
			return fmt.Sprintf("nerve: %s (%s)", e.Code, e.Reason)
		}
		return "nerve: " + e.Code.String()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "nerve: %s: %s", e.Code, e.Message)
	if len(e.FieldViolations) > 0 {
		b.WriteString(" (")
		for i, v := range e.FieldViolations {
			if i > 0 {
				b.WriteString("; ")
			}
			fmt.Fprintf(&b, "%s: %s", v.Field, v.Description)
		}
		b.WriteString(")")
	}
	return b.String()
}

// Is matches the sentinels by code (and reason, for ErrNoResponders and ErrTokenExpired; an error with a
// reason still matches the sentinel of its code alone, ErrUnauthenticated for an expired token).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok || !t.sentinel {
		return false
	}
	return t.Code == e.Code && (t.Reason == "" || t.Reason == e.Reason)
}

// Unwrap is the context error the call gave up on, so that errors.Is(err, context.DeadlineExceeded)
// holds; nil for an RPC error.
func (e *Error) Unwrap() error { return e.cause }

// GRPCStatus makes status.FromError and status.Code see the original status.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

// Violation returns the violation of field, if the server named it.
func (e *Error) Violation(field string) (FieldViolation, bool) {
	for _, v := range e.FieldViolations {
		if v.Field == field {
			return v, true
		}
	}
	return FieldViolation{}, false
}

// Code is the gRPC code of err: codes.OK for nil, codes.Canceled or codes.DeadlineExceeded for a
// context's error, codes.Unknown for other errors that are not RPC errors.
func Code(err error) codes.Code {
	var e *Error
	if errors.As(wrap(err), &e) { // wrap gives a bare context error its code
		return e.Code
	}
	return status.Code(err)
}

// invalidArgument is the error the server would give for a bad field, for a request not sent because of it.
func invalidArgument(field, description string) error {
	return &Error{
		Code:            codes.InvalidArgument,
		Message:         field + ": " + description,
		FieldViolations: []FieldViolation{{Field: field, Description: description}},
	}
}

// checkUTF8 refuses req when one of its strings is not valid UTF-8: protobuf-go cannot marshal it, and
// grpc-go then ends the whole stream it was to go on, with every call pending there. The refusal is this
// call's only, and names the string's field ("events[0].subject").
func checkUTF8(req proto.Message) error {
	if path, bad := badUTF8(req.ProtoReflect()); bad {
		return invalidArgument(strings.TrimPrefix(path, "."), "must be valid UTF-8")
	}
	return nil
}

// unary makes a unary call with req, refused before sending as checkUTF8 refuses it (sent, grpc-go would
// fail the call with codes.Internal, naming no field); a failed call's error is an *Error. Every unary call
// of the Client goes through it.
func unary[Req proto.Message, Resp any](ctx context.Context, call func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	if err := checkUTF8(req); err != nil {
		var zero Resp
		return zero, err
	}
	resp, err := call(ctx, req)
	return resp, wrap(err)
}

// badUTF8 finds the first string of m, in field order (map entries in key order), that is not valid UTF-8,
// and returns its path (".subject", `.extensions["k"].string_value`).
func badUTF8(m protoreflect.Message) (path string, bad bool) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if !m.Has(fd) {
			continue
		}
		name := "." + string(fd.Name())
		switch v := m.Get(fd); {
		case fd.IsList():
			for j, list := 0, v.List(); j < list.Len(); j++ {
				if path, bad := badUTF8Value(fd, list.Get(j)); bad {
					return fmt.Sprintf("%s[%d]%s", name, j, path), true
				}
			}
		case fd.IsMap():
			var keys []protoreflect.MapKey
			v.Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool { keys = append(keys, k); return true })
			sort.Slice(keys, func(a, b int) bool { return keys[a].String() < keys[b].String() })
			for _, k := range keys {
				entry := fmt.Sprintf("%s[%q]", name, k.String())
				if _, bad := badUTF8Value(fd.MapKey(), k.Value()); bad {
					return entry, true
				}
				if path, bad := badUTF8Value(fd.MapValue(), v.Map().Get(k)); bad {
					return entry + path, true
				}
			}
		default:
			if path, bad := badUTF8Value(fd, v); bad {
				return name + path, true
			}
		}
	}
	return "", false
}

// badUTF8Value is badUTF8 for one value of fd's kind: a string that is not valid UTF-8 is bad itself ("").
func badUTF8Value(fd protoreflect.FieldDescriptor, v protoreflect.Value) (path string, bad bool) {
	switch fd.Kind() {
	case protoreflect.StringKind:
		return "", !utf8.ValidString(v.String())
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return badUTF8(v.Message())
	}
	return "", false
}

// wrap turns a failed RPC, or a context error, into an *Error (the context error stays its cause); nil and
// other errors pass through.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	var cause error
	st, ok := status.FromError(err)
	if !ok {
		switch {
		case errors.Is(err, context.Canceled):
			st = status.New(codes.Canceled, err.Error())
		case errors.Is(err, context.DeadlineExceeded):
			st = status.New(codes.DeadlineExceeded, err.Error())
		default:
			return err
		}
		cause = err
	}
	e := &Error{Code: st.Code(), Message: st.Message(), status: st, cause: cause}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.ErrorInfo:
			if e.Reason == "" {
				e.Reason = d.GetReason()
			}
			if len(d.GetMetadata()) > 0 && e.Metadata == nil {
				e.Metadata = map[string]string{}
			}
			for k, v := range d.GetMetadata() {
				e.Metadata[k] = v
			}
		}
	}
	return e
}
