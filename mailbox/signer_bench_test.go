package mailbox

import "testing"

// BenchmarkSignerVerify measures the token check of every request: one
// HMAC-SHA256 per configured secret, since every secret is tried.
func BenchmarkSignerVerify(b *testing.B) {
	for _, tc := range []struct {
		name    string
		secrets []string
	}{
		{"one-secret", []string{"bench-token-secret-0123456789"}},
		{"two-secrets", []string{"bench-token-secret-0123456789", "bench-token-secret-previous-01"}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s, err := NewSigner(tc.secrets)
			if err != nil {
				b.Fatal(err)
			}
			token := s.Issue("alice@example.com", 3)
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := s.Verify(token); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSignerIssue measures issuing a token, an admin API call.
func BenchmarkSignerIssue(b *testing.B) {
	s, err := NewSigner([]string{"bench-token-secret-0123456789"})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		s.Issue("alice@example.com", 3)
	}
}
