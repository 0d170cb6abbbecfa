package proxy

import (
	"bytes"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

// TestLazyAttrsMatchesJSONHandler logs the same calls through the JSON
// handler alone and through lazyAttrs, and expects the same lines.
func TestLazyAttrsMatchesJSONHandler(t *testing.T) {
	noTime := func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	calls := map[string]func(*slog.Logger){
		"plain": func(l *slog.Logger) { l.Info("done", "status", 200) },
		"with twice": func(l *slog.Logger) {
			l.With("request_id", "r1", "provider", "openai").With("mailbox", "m1").Warn("done", "status", 502, "error", "cut")
		},
		"many attrs": func(l *slog.Logger) {
			l.With("a", 1).Info("done", "b", 2, "c", 3, "d", 4, "e", 5, "f", 6, "g", 7, "h", 8)
		},
		"group": func(l *slog.Logger) {
			l.With("request_id", "r1").WithGroup("upstream").With("host", "h").Info("done", "status", 200)
		},
		"empty with and group": func(l *slog.Logger) { l.With().WithGroup("").Info("done") },
		"below level":          func(l *slog.Logger) { l.With("a", 1).Debug("hidden") },
	}
	for name, call := range calls {
		var want, got bytes.Buffer
		opts := &slog.HandlerOptions{ReplaceAttr: noTime}
		call(slog.New(slog.NewJSONHandler(&want, opts)))
		call(slog.New(withLazyAttrs(slog.NewJSONHandler(&got, opts))))
		if got.String() != want.String() {
			t.Errorf("%s:\n got %s\nwant %s", name, got.String(), want.String())
		}
	}
}

// TestLazyAttrsSiblingsSeparate derives two loggers from one parent and
// checks that neither line contains the other's attributes.
func TestLazyAttrsSiblingsSeparate(t *testing.T) {
	var buf bytes.Buffer
	// Three With calls leave spare capacity in the parent's attribute slice.
	parent := slog.New(withLazyAttrs(slog.NewJSONHandler(&buf, nil))).With("a", 1).With("b", 2).With("c", 3)
	first := parent.With("mailbox", "first")
	second := parent.With("mailbox", "second")
	first.Info("x")
	firstLine := buf.String()
	buf.Reset()
	second.Info("x")
	if !strings.Contains(firstLine, `"mailbox":"first"`) {
		t.Errorf("first logger lost its attribute: %s", firstLine)
	}
	if strings.Contains(buf.String(), `"first"`) {
		t.Errorf("second logger has the first one's attribute: %s", buf.String())
	}
}

// TestRequestLogMatchesWith logs through a requestLog and through two With
// calls, as admission did before, and expects the same lines: from the
// logger before and after the mailbox is known, and from loggers derived
// from each.
func TestRequestLogMatchesWith(t *testing.T) {
	noTime := func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	bases := map[string]func(*bytes.Buffer) *slog.Logger{
		"lazy": func(b *bytes.Buffer) *slog.Logger {
			return slog.New(withLazyAttrs(slog.NewJSONHandler(b, &slog.HandlerOptions{ReplaceAttr: noTime})))
		},
		"lazy with attrs": func(b *bytes.Buffer) *slog.Logger {
			return slog.New(withLazyAttrs(slog.NewJSONHandler(b, &slog.HandlerOptions{ReplaceAttr: noTime}))).With("component", "proxy")
		},
		"plain JSON": func(b *bytes.Buffer) *slog.Logger {
			return slog.New(slog.NewJSONHandler(b, &slog.HandlerOptions{ReplaceAttr: noTime}))
		},
	}
	for name, base := range bases {
		var want, got bytes.Buffer
		logAll := func(log *slog.Logger, mailbox func(*slog.Logger) *slog.Logger) {
			early := log.With("phase", "early")
			log.Warn("rejected", "status", 401)
			log = mailbox(log)
			log.Info("done", "status", 200)
			early.Info("early line")
			log.With("phase", "late").Info("late line")
		}
		logAll(base(&want).With("request_id", "r1", "provider", "openai"), func(l *slog.Logger) *slog.Logger {
			return l.With("mailbox", "m1")
		})
		var rl requestLog
		logAll(rl.start(base(&got), "r1", "openai"), func(l *slog.Logger) *slog.Logger {
			return rl.withMailbox(l, "m1")
		})
		if got.String() != want.String() {
			t.Errorf("%s:\n got %s\nwant %s", name, got.String(), want.String())
		}
		if !strings.Contains(got.String(), `"mailbox":"m1"`) {
			t.Errorf("%s: no line carries the mailbox: %s", name, got.String())
		}
	}
}

// TestRequestLogAllocations holds admission's logger to no allocations.
func TestRequestLogAllocations(t *testing.T) {
	base := slog.New(withLazyAttrs(slog.NewJSONHandler(&bytes.Buffer{}, nil)))
	var rl requestLog
	allocs := testing.AllocsPerRun(100, func() {
		log := rl.start(base, "r1", "openai")
		log = rl.withMailbox(log, "m1")
		log.Debug("dropped")
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per request logger, want 0", allocs)
	}
}

// grabbingHandler is a JSON handler that keeps the slice WithAttrs gets,
// so the test can change it later, as slog allows a handler to.
type grabbingHandler struct {
	slog.Handler
	grabbed *[]slog.Attr
}

func (h grabbingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	*h.grabbed = attrs
	return grabbingHandler{Handler: h.Handler.WithAttrs(slices.Clone(attrs)), grabbed: h.grabbed}
}

func (h grabbingHandler) WithGroup(name string) slog.Handler {
	return grabbingHandler{Handler: h.Handler.WithGroup(name), grabbed: h.grabbed}
}

// TestRequestLogKeepsAttrsFromHandlers derives a group from a request's
// logger, which hands its attributes to the wrapped handler, and has that
// handler overwrite and append to the slice. The request's own lines must
// not change.
func TestRequestLogKeepsAttrsFromHandlers(t *testing.T) {
	var buf bytes.Buffer
	var grabbed []slog.Attr
	base := slog.New(withLazyAttrs(grabbingHandler{Handler: slog.NewJSONHandler(&buf, nil), grabbed: &grabbed}))
	var rl requestLog
	log := rl.start(base, "r1", "openai")
	log.WithGroup("upstream")
	if len(grabbed) != 2 {
		t.Fatalf("the handler got %d attributes, want 2", len(grabbed))
	}
	grabbed[0] = slog.String("request_id", "changed")
	grabbed = append(grabbed, slog.String("mailbox", "intruder"))
	_ = grabbed
	log = rl.withMailbox(log, "m1")
	log.Info("done")
	line := buf.String()
	for _, want := range []string{`"request_id":"r1"`, `"provider":"openai"`, `"mailbox":"m1"`} {
		if !strings.Contains(line, want) {
			t.Errorf("line lacks %s: %s", want, line)
		}
	}
	if strings.Contains(line, "changed") || strings.Contains(line, "intruder") {
		t.Errorf("a handler's change reached the request's line: %s", line)
	}
}
