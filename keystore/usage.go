package keystore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/byokproxy/byokproxy/mailbox"
)

// UsageRecord is the usage of one request, counted once.
type UsageRecord struct {
	RequestID    string
	Mailbox      string
	Provider     string
	Source       string // SourceShared or SourceBYOK
	InputTokens  int64
	OutputTokens int64
	Time         time.Time
}

// seenTTL is how long a request's usage is remembered as counted, so a batch
// retried after a lost reply does not count it twice. The audit writer
// retries a batch every few seconds (backoff of at most 5 s) until Redis
// responds, and each marker takes about 160 bytes of Redis.
// TODO: an outage of more than an hour that starts right after Redis applied
// a batch, before its reply arrived, makes the retry count that usage again.
const seenTTL = time.Hour

// recordUsageScript adds one request's usage unless that request was counted
// already. KEYS: usage hash, seen marker. ARGV: field prefix, input, output,
// 1 to add to the shared total, expiry (unix seconds), seen TTL (seconds).
const recordUsageScript = `
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[6]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':requests', 1)
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':input', ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':output', ARGV[3])
if ARGV[4] == '1' then
  -- Two increments, because Lua adds in floating point, and a sum of
  -- more than 14 digits reaches HINCRBY in exponent form, which it rejects.
  redis.call('HINCRBY', KEYS[1], 'total', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'total', ARGV[3])
end
redis.call('EXPIREAT', KEYS[1], ARGV[5])
return 1
`

var recordUsage = redis.NewScript(recordUsageScript)

// QueueUsage adds the increment of u to pipe, sending the script's source.
// The counters of a month expire retentionMonths after the month ends.
func (l Layout) QueueUsage(ctx context.Context, pipe redis.Pipeliner, u UsageRecord, retentionMonths int) *redis.Cmd {
	keys, args := l.usageArgs(u, retentionMonths)
	return recordUsage.Eval(ctx, pipe, keys, args...)
}

// QueueUsageBySHA is QueueUsage naming the script by its SHA1 digest, which
// spares Redis the script's source and its hashing on every increment. On a
// server that does not hold the script yet (a fresh or restarted one) the
// command fails with an error for which IsNoScript is true, and nothing was
// counted: send it again with QueueUsage, which also loads the script.
func (l Layout) QueueUsageBySHA(ctx context.Context, pipe redis.Pipeliner, u UsageRecord, retentionMonths int) *redis.Cmd {
	keys, args := l.usageArgs(u, retentionMonths)
	return recordUsage.EvalSha(ctx, pipe, keys, args...)
}

// IsNoScript reports whether err is Redis's NOSCRIPT error, returned for a
// script digest the server does not hold.
func IsNoScript(err error) bool {
	return redis.HasErrorPrefix(err, "NOSCRIPT")
}

func (l Layout) usageArgs(u UsageRecord, retentionMonths int) (keys []string, args []any) {
	month := Month(u.Time)
	shared := "0"
	if u.Source == SourceShared {
		shared = "1"
	}
	start := time.Date(u.Time.UTC().Year(), u.Time.UTC().Month(), 1, 0, 0, 0, 0, time.UTC)
	expireAt := start.AddDate(0, retentionMonths+1, 0).Unix()
	keys = []string{l.Usage(u.Mailbox, month), l.Seen(u.Mailbox, u.RequestID)}
	args = []any{u.Provider + ":" + u.Source, recordedTokens(u.InputTokens), recordedTokens(u.OutputTokens), shared, expireAt, int64(seenTTL / time.Second)}
	return keys, args
}

// maxRecordedTokens bounds the tokens one request adds to a counter. It is
// far above any real request, and low enough that the counters' int64
// cannot overflow: HINCRBY would then fail after the script's earlier
// writes, which Redis does not undo.
const maxRecordedTokens = 1 << 40

// recordedTokens returns n within 0 and maxRecordedTokens.
func recordedTokens(n int64) int64 {
	return min(max(n, 0), maxRecordedTokens)
}

// PendingUsage is the usage of one shared request that a replica has
// charged and the audit writer has not yet reported written.
type PendingUsage struct {
	RequestID string
	Month     string // YYYY-MM of the request, as UsageRecord.Time gives it
	Tokens    int64
}

// usedWithPendingScript returns the month's shared total, plus the tokens of
// each pending request whose seen marker is not set yet. Redis runs a script
// without interleaving other commands, and recordUsageScript sets a marker
// with its increment, so each request counts exactly once.
// KEYS: usage hash, then one seen marker per request. ARGV: the total's
// field, then the tokens of each request.
const usedWithPendingScript = `
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    used = used + tonumber(ARGV[i])
  end
end
return used
`

var usedWithPending = redis.NewScript(usedWithPendingScript)

// UsedShared returns mailbox id's shared total of the current month with
// the usage of pending added where Redis has not counted it yet. pending
// holds one replica's own requests; those of another month are left out.
func (s *Store) UsedShared(ctx context.Context, id mailbox.ID, pending []PendingUsage) (int64, error) {
	month := Month(s.now())
	keys := []string{s.layout.Usage(string(id), month)}
	args := []any{UsageTotalField}
	for _, p := range pending {
		if p.Month == month {
			keys = append(keys, s.layout.Seen(string(id), p.RequestID))
			// As the usage script records at most maxRecordedTokens a
			// side, so that the script's floating-point sum stays exact.
			args = append(args, min(max(p.Tokens, 0), 2*maxRecordedTokens))
		}
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	used, err := usedWithPending.Run(ctx, s.rdb, keys, args...).Int64()
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return used, nil
}

// Counts are the usage counters of one provider and source.
type Counts struct {
	Requests     int64 `json:"requests"`
	InputTokens  int64 `json:"input_tokens"`
	OutputTokens int64 `json:"output_tokens"`
}

// MonthUsage is a mailbox's usage in one month.
type MonthUsage struct {
	// Providers maps provider, then source, to counts.
	Providers map[string]map[string]Counts
	// SharedTotal is the input plus output tokens on the shared source.
	SharedTotal int64
}

// Usage returns mailbox id's usage in month (YYYY-MM).
func (s *Store) Usage(ctx context.Context, id mailbox.ID, month string) (MonthUsage, error) {
	fields, err := s.rdb.HGetAll(ctx, s.layout.Usage(string(id), month)).Result()
	if err != nil {
		return MonthUsage{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	out := MonthUsage{Providers: map[string]map[string]Counts{}}
	for field, value := range fields {
		n, _ := strconv.ParseInt(value, 10, 64)
		if field == UsageTotalField {
			out.SharedTotal = n
			continue
		}
		parts := strings.Split(field, ":")
		if len(parts) != 3 {
			continue
		}
		bySource := out.Providers[parts[0]]
		if bySource == nil {
			bySource = map[string]Counts{}
			out.Providers[parts[0]] = bySource
		}
		c := bySource[parts[1]]
		switch parts[2] {
		case "requests":
			c.Requests = n
		case "input":
			c.InputTokens = n
		case "output":
			c.OutputTokens = n
		}
		bySource[parts[1]] = c
	}
	return out, nil
}

// QueueOwned adds to pipe that mailbox id created resource, a response or a
// container id, on the shared key, remembered for ttl.
func (l Layout) QueueOwned(ctx context.Context, pipe redis.Pipeliner, id, resource string, now time.Time, ttl time.Duration) {
	key := l.Owned(id)
	expiry := float64(now.Add(ttl).Unix())
	pipe.ZAdd(ctx, key, redis.Z{Score: expiry, Member: resource})
	pipe.ZRemRangeByScore(ctx, key, "-inf", strconv.FormatInt(now.Unix(), 10))
	pipe.ExpireAt(ctx, key, now.Add(ttl))
}

// RecordOwned stores that mailbox id created the resources, response or
// container ids, on the shared key, remembered for ttl.
func (s *Store) RecordOwned(ctx context.Context, id mailbox.ID, resources []string, ttl time.Duration) error {
	pipe := s.rdb.Pipeline()
	now := s.now()
	for _, r := range resources {
		s.layout.QueueOwned(ctx, pipe, string(id), r, now, ttl)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// FirstNotOwned returns the first of resources, response or container
// ids, that mailbox id did not create on the shared key within the
// remembered period, or "" when it created them all. One round trip checks
// them all.
func (s *Store) FirstNotOwned(ctx context.Context, id mailbox.ID, resources []string) (string, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	scores, err := s.rdb.ZMScore(ctx, s.layout.Owned(string(id)), resources...).Result()
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	now := float64(s.now().Unix())
	for i, score := range scores {
		// A member that is not in the set reads as 0.
		if score <= now {
			return resources[i], nil
		}
	}
	return "", nil
}

// Owns reports whether mailbox id created resource, a response or a
// container id, on the shared key within the remembered period.
func (s *Store) Owns(ctx context.Context, id mailbox.ID, resource string) (bool, error) {
	missing, err := s.FirstNotOwned(ctx, id, []string{resource})
	return err == nil && missing == "", err
}
