// Package mailbox validates mailbox ids and issues and verifies mailbox
// tokens: the credential an application sends in place of a provider key.
//
// A token is "bp1.<id>.<generation>.<mac>", where <id> is the mailbox id in
// unpadded base64url, <generation> is a decimal counter and <mac> is the
// unpadded base64url HMAC-SHA256 of the id and generation under a token
// secret. It uses only A-Z a-z 0-9 - _ and ".", so it fits an HTTP header, a
// query string and the password of a proxy URL. The generation ties a token
// to the mailbox's current generation in Redis; raising that revokes every
// older token.
package mailbox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"hash"
	"strconv"
	"strings"
	"sync"
)

// MaxIDLength is the longest mailbox id accepted.
const MaxIDLength = 128

// IDRule describes a valid mailbox id, for error messages.
const IDRule = "a mailbox id is 1 to 128 characters of A-Z a-z 0-9 - _ . @ +"

// ID is a mailbox id. Values from ParseID are validated, so they are safe to
// use in a Redis key, a log line or a URL path. A conversion from a string
// skips that check.
type ID string

// ParseID validates s as a mailbox id.
func ParseID(s string) (ID, error) {
	if len(s) == 0 || len(s) > MaxIDLength {
		return "", errors.New("invalid mailbox id: " + IDRule)
	}
	for i := 0; i < len(s); i++ {
		if !idByte(s[i]) {
			return "", errors.New("invalid mailbox id: " + IDRule)
		}
	}
	return ID(s), nil
}

func idByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return c == '-' || c == '_' || c == '.' || c == '@' || c == '+'
}

// ErrInvalidToken is returned for a token that is malformed or whose MAC
// matches none of the secrets. It does not say which, so a caller cannot probe
// for valid mailbox ids.
var ErrInvalidToken = errors.New("invalid mailbox token")

const tokenVersion = "bp1"

// macTextLen is the length of a MAC in unpadded base64url: six bits per
// character.
const macTextLen = (sha256.Size*8 + 5) / 6

// maxEncodedID is the length of the longest valid id in unpadded base64url.
const maxEncodedID = (MaxIDLength*8 + 5) / 6

// LooksLikeToken reports whether s has the form of a mailbox token, valid or
// not: it starts with the token version. Other strings, such as the
// placeholder key an SDK needs before it sends a request, are not tokens.
func LooksLikeToken(s string) bool {
	return strings.HasPrefix(s, tokenVersion+".")
}

// Signer issues and verifies tokens. The first secret signs and every secret
// verifies, so a new secret can be put first while tokens signed with the
// old one keep working until it is removed.
type Signer struct {
	keys []*macKey
}

// macKey computes HMAC-SHA256 under one secret with pooled states, whose
// Reset restores the keying that hmac.New would hash and allocate again.
type macKey struct {
	pool sync.Pool // of *macState
}

type macState struct {
	h   hash.Hash
	msg []byte
}

func newMACKey(secret []byte) *macKey {
	k := &macKey{}
	k.pool.New = func() any { return &macState{h: hmac.New(sha256.New, secret)} }
	return k
}

// sign writes the MAC of the id and generation to out.
func (k *macKey) sign(out *[sha256.Size]byte, encodedID, gen string) {
	const domain = "byokproxy mailbox token v1\x00"
	st := k.pool.Get().(*macState)
	st.msg = append(st.msg[:0], domain...)
	st.msg = append(st.msg, encodedID...)
	st.msg = append(st.msg, 0)
	st.msg = append(st.msg, gen...)
	st.h.Reset()
	st.h.Write(st.msg)
	st.h.Sum(out[:0])
	k.pool.Put(st)
}

// NewSigner returns a signer over secrets, of which there must be at least
// one.
func NewSigner(secrets []string) (*Signer, error) {
	if len(secrets) == 0 {
		return nil, errors.New("mailbox: no token secret")
	}
	s := &Signer{}
	for _, secret := range secrets {
		s.keys = append(s.keys, newMACKey([]byte(secret)))
	}
	return s, nil
}

// Issue returns the token of mailbox id at generation gen.
func (s *Signer) Issue(id ID, gen int64) string {
	encoded := base64.RawURLEncoding.EncodeToString([]byte(id))
	genText := strconv.FormatInt(gen, 10)
	var mac [sha256.Size]byte
	s.keys[0].sign(&mac, encoded, genText)
	return tokenVersion + "." + encoded + "." + genText + "." + base64.RawURLEncoding.EncodeToString(mac[:])
}

// Verify checks token and returns the mailbox and generation it names. The
// caller must still compare the generation with the mailbox's current one.
func (s *Signer) Verify(token string) (ID, int64, error) {
	// The four parts are split by hand so a long hostile token costs no
	// allocation beyond the decoded id.
	rest, ok := strings.CutPrefix(token, tokenVersion+".")
	if !ok || len(token) > 512 || !tokenChars(token) {
		return "", 0, ErrInvalidToken
	}
	encoded, rest, ok1 := strings.Cut(rest, ".")
	genText, macText, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 {
		return "", 0, ErrInvalidToken
	}
	gen, err := strconv.ParseInt(genText, 10, 64)
	if err != nil || gen < 0 || strconv.FormatInt(gen, 10) != genText {
		return "", 0, ErrInvalidToken
	}
	// Strict decoding rejects a last character whose unused low bits are
	// set, so a token has exactly one spelling. The text is copied to an
	// array first, because converting it to a slice would allocate.
	var macBuf [macTextLen]byte
	var mac [sha256.Size]byte
	if len(macText) != macTextLen {
		return "", 0, ErrInvalidToken
	}
	copy(macBuf[:], macText)
	if n, err := base64.RawURLEncoding.Strict().Decode(mac[:], macBuf[:]); err != nil || n != sha256.Size {
		return "", 0, ErrInvalidToken
	}
	valid := false
	var want [sha256.Size]byte
	for _, k := range s.keys {
		// Every secret is tried, so the time taken does not reveal which one
		// signed the token.
		k.sign(&want, encoded, genText)
		if hmac.Equal(mac[:], want[:]) {
			valid = true
		}
	}
	if !valid {
		return "", 0, ErrInvalidToken
	}
	// An id of MaxIDLength bytes takes maxEncodedID characters, and a
	// longer one is invalid whatever it decodes to.
	var idText [maxEncodedID]byte
	var raw [MaxIDLength]byte
	if len(encoded) > maxEncodedID {
		return "", 0, ErrInvalidToken
	}
	n, err := base64.RawURLEncoding.Decode(raw[:], idText[:copy(idText[:], encoded)])
	if err != nil {
		return "", 0, ErrInvalidToken
	}
	id, err := ParseID(string(raw[:n]))
	if err != nil {
		return "", 0, ErrInvalidToken
	}
	return id, gen, nil
}

// tokenChars reports whether s uses only the characters of a token. The
// base64 decoder skips newlines, so without this check a token with a line
// break inserted would still verify.
func tokenChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
