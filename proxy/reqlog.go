package proxy

import (
	"context"
	"log/slog"
	"slices"
)

// lazyAttrs is a slog.Handler that formats the attributes given to With only
// when a record is logged. The JSON handler formats them in With, which costs
// a second pass for a per-request logger that mostly logs one line.
type lazyAttrs struct {
	next  slog.Handler
	attrs []slog.Attr
}

// withLazyAttrs wraps h, unless it is already wrapped.
func withLazyAttrs(h slog.Handler) slog.Handler {
	if _, ok := h.(*lazyAttrs); ok {
		return h
	}
	return &lazyAttrs{next: h}
}

func (h *lazyAttrs) Enabled(ctx context.Context, level slog.Level) bool {
	return h.next.Enabled(ctx, level)
}

func (h *lazyAttrs) Handle(ctx context.Context, r slog.Record) error {
	if len(h.attrs) == 0 {
		return h.next.Handle(ctx, r)
	}
	// A new record leaves the caller's attribute storage untouched. The With
	// attributes come first, as the wrapped handler would put them.
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	out.AddAttrs(h.attrs...)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(a)
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h *lazyAttrs) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	// The full slice expression makes append copy, so loggers derived from
	// one parent never share storage.
	return &lazyAttrs{next: h.next, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], attrs...)}
}

func (h *lazyAttrs) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	// A group applies to the attributes after it, so the earlier ones go to
	// the wrapped handler first.
	next := h.next
	if len(h.attrs) > 0 {
		// A handler owns the slice WithAttrs gets and may change it, so it
		// gets a copy.
		next = next.WithAttrs(slices.Clone(h.attrs))
	}
	return &lazyAttrs{next: next.WithGroup(name)}
}

// requestLog is a request's logger, kept in its exchange so that adding its
// attributes allocates nothing, where two slog.Logger.With calls took nine.
type requestLog struct {
	attrs   [3]slog.Attr
	handler lazyAttrs
	logger  slog.Logger
}

// start returns base with the request id and provider added.
func (l *requestLog) start(base *slog.Logger, id, provider string) *slog.Logger {
	l.attrs[0] = slog.String("request_id", id)
	l.attrs[1] = slog.String("provider", provider)
	parent, ok := base.Handler().(*lazyAttrs)
	if !ok || len(parent.attrs) > 0 {
		return base.With(l.attrs[0], l.attrs[1])
	}
	l.handler = lazyAttrs{next: parent.next, attrs: l.attrs[:2]}
	l.logger = *slog.New(&l.handler)
	return &l.logger
}

// withMailbox returns log with the mailbox added. When log came from start,
// it adds the mailbox in place: no other goroutine logs for the request
// yet, and loggers derived from it kept copies of their attributes.
func (l *requestLog) withMailbox(log *slog.Logger, id string) *slog.Logger {
	if log != &l.logger {
		return log.With("mailbox", id)
	}
	l.attrs[2] = slog.String("mailbox", id)
	l.handler.attrs = l.attrs[:3]
	return log
}
