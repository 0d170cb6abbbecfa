package keystore

import (
	"fmt"
	"log/slog"
)

// Secret is a plaintext provider key. It never prints itself: String,
// GoString, Format, LogValue and MarshalJSON all render a placeholder, so a
// Secret that reaches a log line, an error or a JSON body by mistake shows
// nothing of the key.
type Secret struct {
	b []byte
}

const redacted = "[REDACTED]"

// NewSecret takes ownership of b; the caller must not use b afterwards.
func NewSecret(b []byte) *Secret {
	return &Secret{b: b}
}

// Bytes returns the key itself. Callers must not keep the slice past Wipe.
func (s *Secret) Bytes() []byte {
	if s == nil {
		return nil
	}
	return s.b
}

// Last4 returns the last four characters of the key, the only part of it
// ever shown again.
func (s *Secret) Last4() string {
	if s == nil || len(s.b) < 4 {
		return ""
	}
	return string(s.b[len(s.b)-4:])
}

// Wipe overwrites the key with zeros. Copies that Go made elsewhere, such as
// the string set in an HTTP header, are out of its reach.
func (s *Secret) Wipe() {
	if s == nil {
		return
	}
	clear(s.b)
	s.b = nil
}

func (s *Secret) String() string                { return redacted }
func (s *Secret) GoString() string              { return redacted }
func (s *Secret) Format(f fmt.State, verb rune) { f.Write([]byte(redacted)) }
func (s *Secret) LogValue() slog.Value          { return slog.StringValue(redacted) }
func (s *Secret) MarshalJSON() ([]byte, error)  { return []byte(`"` + redacted + `"`), nil }
func (s *Secret) MarshalText() ([]byte, error)  { return []byte(redacted), nil }
