package keystore

// Layout names the Redis keys byokproxy uses. Every key of one mailbox
// carries the mailbox id as a hash tag ({id}), so on Redis Cluster they sit in
// one slot and a multi-key script or transaction over them stays atomic.
//
//	{prefix}mbx:{id}          hash: gen, limit, and per provider src:P, ct:P, last4:P, upd:P
//	{prefix}use:{id}:YYYY-MM  hash: P:SOURCE:requests, P:SOURCE:input, P:SOURCE:output, total
//	{prefix}seen:{id}:REQID   string: marks a usage increment as applied
//	{prefix}resp:{id}         sorted set: ids of responses created on the shared key, scored by expiry
//	{prefix}audit             stream: audit events
//	{prefix}changes           pub/sub channel: ids of mailboxes whose record changed
type Layout struct {
	Prefix string
}

// Mailbox returns the key of the mailbox's hash.
func (l Layout) Mailbox(id string) string { return l.Prefix + "mbx:{" + id + "}" }

// Usage returns the key of the mailbox's usage counters for month (YYYY-MM).
func (l Layout) Usage(id, month string) string { return l.Prefix + "use:{" + id + "}:" + month }

// Seen returns the key that marks the usage of one request as counted.
func (l Layout) Seen(id, requestID string) string {
	return l.Prefix + "seen:{" + id + "}:" + requestID
}

// Owned returns the key of the sorted set of the response and container ids
// that the mailbox created on the shared key, each scored by its expiry.
func (l Layout) Owned(id string) string { return l.Prefix + "resp:{" + id + "}" }

// Audit returns the key of the audit stream.
func (l Layout) Audit() string { return l.Prefix + "audit" }

// Changes returns the pub/sub channel on which every write to a mailbox's
// record announces the mailbox id.
func (l Layout) Changes() string { return l.Prefix + "changes" }

// Hash fields of the mailbox hash.
const (
	fieldGeneration = "gen"
	fieldLimit      = "limit"
)

func fieldSource(provider string) string  { return "src:" + provider }
func fieldCipher(provider string) string  { return "ct:" + provider }
func fieldLast4(provider string) string   { return "last4:" + provider }
func fieldUpdated(provider string) string { return "upd:" + provider }

// UsageTotalField is the usage hash field that sums input and output tokens
// on the shared source across providers: the figure the allowance limits.
const UsageTotalField = "total"
