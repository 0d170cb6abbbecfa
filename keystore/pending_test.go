package keystore

import (
	"context"
	"testing"
	"time"

	"github.com/byokproxy/byokproxy/mailbox"
)

// TestUsedSharedCountsPendingOnce checks that a pending request adds its
// tokens only while Redis has not counted it, and that one of another month
// adds nothing.
func TestUsedSharedCountsPendingOnce(t *testing.T) {
	s, _, _ := newStore(t)
	ctx := context.Background()
	id := "pending@example.com"
	now := time.Now()
	month := Month(now)
	counted := UsageRecord{RequestID: "req-counted", Mailbox: id, Provider: "openai", Source: SourceShared, InputTokens: 7, OutputTokens: 3, Time: now}
	pipe := s.rdb.Pipeline()
	s.layout.QueueUsage(ctx, pipe, counted, 13)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}
	pending := []PendingUsage{
		{RequestID: "req-counted", Month: month, Tokens: 10},
		{RequestID: "req-waiting", Month: month, Tokens: 5},
		{RequestID: "req-last-month", Month: "1999-12", Tokens: 100},
	}
	used, err := s.UsedShared(ctx, mailbox.ID(id), pending)
	if err != nil {
		t.Fatal(err)
	}
	if used != 15 {
		t.Errorf("used = %d, want 10 counted plus 5 pending", used)
	}
	used, err = s.UsedShared(ctx, "nobody@example.com", nil)
	if err != nil || used != 0 {
		t.Errorf("used = %d, %v for a mailbox with no usage, want 0", used, err)
	}
}
