package keystore

import (
	"bytes"
	"compress/zlib"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"slices"
	"strings"
	"testing"

	agetest "c2sp.org/CCTV/age"
	"filippo.io/age"
	"filippo.io/age/armor"
	"golang.org/x/crypto/chacha20poly1305"
)

// cctvVector is one C2SP CCTV age test vector.
type cctvVector struct {
	expect      string
	payloadHash []byte
	identities  []*age.X25519Identity
	onlyX25519  bool
	armored     bool
	file        []byte
}

func parseCCTVVector(t *testing.T, data []byte) *cctvVector {
	t.Helper()
	v := &cctvVector{onlyX25519: true}
	compressed := false
	rest := data
	for {
		line, after, ok := bytes.Cut(rest, []byte("\n"))
		if !ok {
			t.Fatal("invalid vector: no empty line before the file")
		}
		rest = after
		if len(line) == 0 {
			break
		}
		key, value, _ := strings.Cut(string(line), ": ")
		switch key {
		case "expect":
			v.expect = value
		case "payload":
			h, err := hex.DecodeString(value)
			if err != nil {
				t.Fatalf("invalid payload hash %q: %v", value, err)
			}
			v.payloadHash = h
		case "identity":
			x, err := age.ParseX25519Identity(value)
			if err != nil {
				v.onlyX25519 = false // a hybrid (post-quantum) identity
				continue
			}
			v.identities = append(v.identities, x)
		case "passphrase":
			v.onlyX25519 = false
		case "armored":
			v.armored = true
		case "compressed":
			compressed = true
		}
	}
	v.file = rest
	if compressed {
		zr, err := zlib.NewReader(bytes.NewReader(rest))
		if err != nil {
			t.Fatalf("zlib: %v", err)
		}
		if v.file, err = io.ReadAll(zr); err != nil {
			t.Fatalf("zlib: %v", err)
		}
	}
	return v
}

// cctvResult names a decryption result the way the CCTV expect key does.
func cctvResult(err error, headerDone bool) string {
	var noMatch *age.NoIdentityMatchError
	var armorErr *armor.Error
	switch {
	case err == nil:
		return "success"
	case errors.As(err, &armorErr):
		return "armor failure"
	case strings.HasSuffix(err.Error(), "bad header MAC"):
		return "HMAC failure"
	case errors.As(err, &noMatch):
		return "no match"
	case headerDone:
		return "payload failure"
	}
	return "header failure"
}

// ageDecryptAll decrypts with age.Decrypt and reads the payload to EOF.
func ageDecryptAll(file []byte, armored bool, ids ...age.Identity) ([]byte, string) {
	var src io.Reader = bytes.NewReader(file)
	if armored {
		src = armor.NewReader(src)
	}
	r, err := age.Decrypt(src, ids...)
	if err != nil {
		return nil, cctvResult(err, false)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		return nil, cctvResult(err, true)
	}
	return out, "success"
}

// decryptSmallFirst is the keystore's decryption order: openSmall, and
// age.Decrypt for what openSmall leaves to it.
func decryptSmallFirst(file []byte, ids []age.Identity) ([]byte, string, bool) {
	plain, err := openSmall(file, ids)
	if errors.Is(err, errNotSmall) {
		plain, result := ageDecryptAll(file, false, ids...)
		return plain, result, false
	}
	headerDone := err != nil && errors.Is(err, errBadPayload)
	if err != nil {
		return nil, cctvResult(err, headerDone), true
	}
	return plain, "success", true
}

func fastIdentities(t testing.TB, xs []*age.X25519Identity) []age.Identity {
	t.Helper()
	var ids []age.Identity
	for _, x := range xs {
		id, err := newFastIdentity(x)
		if err != nil {
			t.Fatalf("newFastIdentity: %v", err)
		}
		ids = append(ids, id)
	}
	return ids
}

func checkCCTVPayload(t *testing.T, name string, v *cctvVector, plain []byte) {
	t.Helper()
	if v.expect != "success" || v.payloadHash == nil {
		return
	}
	if sum := sha256.Sum256(plain); !bytes.Equal(sum[:], v.payloadHash) {
		t.Errorf("%s: payload hash %x, want %x", name, sum, v.payloadHash)
	}
}

// TestCCTVVectors decrypts every C2SP CCTV age vector whose identities are
// all X25519 three ways: age.Decrypt with age's identity, age.Decrypt with
// the fast identity, and openSmall with age.Decrypt as its fallback. Each
// must give the vector's expected result.
func TestCCTVVectors(t *testing.T) {
	entries, err := fs.ReadDir(agetest.Vectors, ".")
	if err != nil {
		t.Fatalf("read CCTV vectors: %v", err)
	}
	var tested, small int
	for _, entry := range entries {
		data, err := fs.ReadFile(agetest.Vectors, entry.Name())
		if err != nil {
			t.Fatalf("read vector %s: %v", entry.Name(), err)
		}
		v := parseCCTVVector(t, data)
		if !v.onlyX25519 || len(v.identities) == 0 {
			continue
		}
		tested++
		t.Run(entry.Name(), func(t *testing.T) {
			var reference []age.Identity
			for _, x := range v.identities {
				reference = append(reference, x)
			}
			fast := fastIdentities(t, v.identities)

			plain, got := ageDecryptAll(v.file, v.armored, reference...)
			if got != v.expect {
				t.Fatalf("age identity: got %s, want %s", got, v.expect)
			}
			checkCCTVPayload(t, "age identity", v, plain)

			plain, got = ageDecryptAll(v.file, v.armored, fast...)
			if got != v.expect {
				t.Errorf("fast identity: got %s, want %s", got, v.expect)
			}
			checkCCTVPayload(t, "fast identity", v, plain)

			if v.armored {
				return
			}
			plain, got, handled := decryptSmallFirst(v.file, fast)
			if handled {
				small++
			}
			if got != v.expect {
				t.Errorf("openSmall (handled itself: %v): got %s, want %s", handled, got, v.expect)
			}
			checkCCTVPayload(t, "openSmall", v, plain)
		})
	}
	// The corpus of 2026-08 has 100 such vectors. Far fewer means that the
	// vectors were not found or not parsed.
	if tested < 60 {
		t.Errorf("tested %d X25519 vectors, want at least 60", tested)
	}
	if small < 40 {
		t.Errorf("openSmall handled %d vectors itself, want at least 40", small)
	}
	t.Logf("%d X25519 vectors, %d handled by openSmall itself", tested, small)
}

func ageEncryptTo(t testing.TB, plain []byte, recipients ...age.Recipient) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := age.Encrypt(&out, recipients...)
	if err != nil {
		t.Fatalf("age.Encrypt: %v", err)
	}
	if _, err := w.Write(plain); err != nil {
		t.Fatalf("age.Encrypt: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("age.Encrypt: %v", err)
	}
	return out.Bytes()
}

func generateX25519(t testing.TB) *age.X25519Identity {
	t.Helper()
	x, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatalf("generate identity: %v", err)
	}
	return x
}

// TestOpenSmallRoundTrip decrypts files written by age.Encrypt.
func TestOpenSmallRoundTrip(t *testing.T) {
	ours := generateX25519(t)
	other := generateX25519(t)
	ids := fastIdentities(t, []*age.X25519Identity{ours})
	tests := []struct {
		name       string
		size       int
		recipients []age.Recipient
		notSmall   bool
	}{
		{"empty", 0, []age.Recipient{ours.Recipient()}, false},
		{"one byte", 1, []age.Recipient{ours.Recipient()}, false},
		{"key payload", 120, []age.Recipient{ours.Recipient()}, false},
		{"second stanza", 120, []age.Recipient{other.Recipient(), ours.Recipient()}, false},
		{"4 KiB", 4096, []age.Recipient{ours.Recipient()}, false},
		{"full chunk", 64 << 10, []age.Recipient{ours.Recipient()}, false},
		{"two chunks", 64<<10 + 1, []age.Recipient{ours.Recipient()}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plain := make([]byte, tt.size)
			rand.Read(plain)
			file := ageEncryptTo(t, plain, tt.recipients...)
			got, err := openSmall(file, ids)
			if tt.notSmall {
				if !errors.Is(err, errNotSmall) {
					t.Fatalf("openSmall: got %v, want errNotSmall", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("openSmall: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Errorf("openSmall: plaintext differs")
			}
		})
	}
}

// TestOpenSmallWrongIdentity checks that a file for another recipient is
// "no match", as with age.Decrypt.
func TestOpenSmallWrongIdentity(t *testing.T) {
	file := ageEncryptTo(t, []byte("secret"), generateX25519(t).Recipient())
	_, err := openSmall(file, fastIdentities(t, []*age.X25519Identity{generateX25519(t)}))
	var noMatch *age.NoIdentityMatchError
	if !errors.As(err, &noMatch) {
		t.Fatalf("openSmall: got %v, want *age.NoIdentityMatchError", err)
	}
}

// TestOpenSmallTamper flips each bit of a file in turn: openSmall with its
// fallback and age.Decrypt must agree on every result.
func TestOpenSmallTamper(t *testing.T) {
	x := generateX25519(t)
	ids := fastIdentities(t, []*age.X25519Identity{x})
	file := ageEncryptTo(t, []byte("byokproxy-key/v1\nalice@example.com\nopenai\nsk-proj-0123456789abcdef"), x.Recipient())
	for i := range file {
		for bit := range 8 {
			bad := bytes.Clone(file)
			bad[i] ^= 1 << bit
			want, wantResult := ageDecryptAll(bad, false, x)
			got, gotResult, _ := decryptSmallFirst(bad, ids)
			if gotResult != wantResult || !bytes.Equal(got, want) {
				t.Fatalf("byte %d bit %d: openSmall gives %s, age.Decrypt gives %s", i, bit, gotResult, wantResult)
			}
		}
	}
	extended := append(bytes.Clone(file), 0)
	if _, result, _ := decryptSmallFirst(extended, ids); result == "success" {
		t.Errorf("trailing byte: openSmall succeeded")
	}
	for n := range len(file) {
		if _, result, _ := decryptSmallFirst(file[:n], ids); result == "success" {
			t.Fatalf("truncated to %d bytes: openSmall succeeded", n)
		}
	}
}

// specFile builds an age v1 file for recipient from the specification
// alone, with a fixed ephemeral scalar, file key and payload nonce: an
// X25519 stanza, the header MAC and one STREAM chunk.
func specFile(t *testing.T, recipient []byte, plain []byte) []byte {
	t.Helper()
	ephemeral, err := ecdh.X25519().NewPrivateKey(bytes.Repeat([]byte{0x42}, 32))
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := ecdh.X25519().NewPublicKey(recipient)
	if err != nil {
		t.Fatal(err)
	}
	shared, err := ephemeral.ECDH(theirs)
	if err != nil {
		t.Fatal(err)
	}
	share := ephemeral.PublicKey().Bytes()
	fileKey := []byte("YELLOW SUBMARINE")
	wrapKey, _ := hkdf.Key(sha256.New, shared, append(bytes.Clone(share), recipient...), "age-encryption.org/v1/X25519", 32)
	wrapAEAD, _ := chacha20poly1305.New(wrapKey)
	body := wrapAEAD.Seal(nil, make([]byte, 12), fileKey, nil)

	b64 := base64.RawStdEncoding
	header := "age-encryption.org/v1\n-> X25519 " + b64.EncodeToString(share) + "\n" + b64.EncodeToString(body) + "\n---"
	macKey, _ := hkdf.Key(sha256.New, fileKey, nil, "header", 32)
	mac := hmac.New(sha256.New, macKey)
	mac.Write([]byte(header))
	header += " " + b64.EncodeToString(mac.Sum(nil)) + "\n"

	nonce := bytes.Repeat([]byte{0x07}, 16)
	streamKey, _ := hkdf.Key(sha256.New, fileKey, nonce, "payload", 32)
	streamAEAD, _ := chacha20poly1305.New(streamKey)
	chunkNonce := make([]byte, 12)
	chunkNonce[11] = 1
	file := append([]byte(header), nonce...)
	return streamAEAD.Seal(file, chunkNonce, plain, nil)
}

// TestSpecFile decrypts a file built from the age specification with both
// age.Decrypt and openSmall.
func TestSpecFile(t *testing.T) {
	x := generateX25519(t)
	recipient, err := decodeBech32Payload(x.Recipient().String(), "age")
	if err != nil {
		t.Fatalf("decode recipient: %v", err)
	}
	plain := []byte("byokproxy-key/v1\nbob\nanthropic\nsk-ant-api03-0123456789")
	file := specFile(t, recipient, plain)

	got, result := ageDecryptAll(file, false, x)
	if result != "success" || !bytes.Equal(got, plain) {
		t.Fatalf("age.Decrypt of the hand-built file: %s", result)
	}
	got, err = openSmall(file, fastIdentities(t, []*age.X25519Identity{x}))
	if err != nil {
		t.Fatalf("openSmall of the hand-built file: %v", err)
	}
	if !bytes.Equal(got, plain) {
		t.Errorf("openSmall: plaintext differs")
	}
}

// TestFastIdentityUnwrap compares the file keys both identities unwrap from
// stanzas age wraps, and their errors.
func TestFastIdentityUnwrap(t *testing.T) {
	x := generateX25519(t)
	fast := fastIdentities(t, []*age.X25519Identity{x})[0]
	fileKey := []byte("0123456789abcdef")
	stanzas, err := x.Recipient().Wrap(fileKey)
	if err != nil {
		t.Fatalf("wrap: %v", err)
	}
	got, err := fast.Unwrap(stanzas)
	if err != nil {
		t.Fatalf("unwrap: %v", err)
	}
	if !bytes.Equal(got, fileKey) {
		t.Errorf("unwrap: got file key %x, want %x", got, fileKey)
	}

	otherStanzas, _ := generateX25519(t).Recipient().Wrap(fileKey)
	if _, err := fast.Unwrap(otherStanzas); !errors.Is(err, age.ErrIncorrectIdentity) {
		t.Errorf("stanza for another recipient: got %v, want age.ErrIncorrectIdentity", err)
	}

	malformed := []struct {
		name   string
		stanza age.Stanza
	}{
		{"no argument", age.Stanza{Type: "X25519", Body: stanzas[0].Body}},
		{"two arguments", age.Stanza{Type: "X25519", Args: []string{stanzas[0].Args[0], "x"}, Body: stanzas[0].Body}},
		{"short share", age.Stanza{Type: "X25519", Args: []string{stanzas[0].Args[0][:40]}, Body: stanzas[0].Body}},
		{"long share", age.Stanza{Type: "X25519", Args: []string{stanzas[0].Args[0] + "AAAA"}, Body: stanzas[0].Body}},
		{"low order share", age.Stanza{Type: "X25519", Args: []string{base64.RawStdEncoding.EncodeToString(make([]byte, 32))}, Body: stanzas[0].Body}},
		{"long body", age.Stanza{Type: "X25519", Args: stanzas[0].Args, Body: append(bytes.Clone(stanzas[0].Body), 0)}},
	}
	for _, m := range malformed {
		_, errFast := fast.Unwrap([]*age.Stanza{&m.stanza})
		_, errAge := x.Unwrap([]*age.Stanza{&m.stanza})
		if errFast == nil || errors.Is(errFast, age.ErrIncorrectIdentity) {
			t.Errorf("%s: fast identity returned %v, want a malformed-stanza error", m.name, errFast)
		}
		if errAge == nil || errors.Is(errAge, age.ErrIncorrectIdentity) {
			t.Errorf("%s: age identity returned %v; the case does not test what it claims", m.name, errAge)
		}
	}
}

func TestDecodeBech32(t *testing.T) {
	x := generateX25519(t)
	text := x.String()
	if _, err := decodeSecretKey(text); err != nil {
		t.Fatalf("valid identity: %v", err)
	}
	if _, err := decodeSecretKey(strings.ToLower(text)); err != nil {
		t.Errorf("lower case identity: %v", err)
	}
	bad := []struct {
		name string
		text string
	}{
		{"mixed case", "age-secret-key-1" + text[len("AGE-SECRET-KEY-1"):]},
		{"wrong type", x.Recipient().String()},
		{"bad checksum", text[:len(text)-1] + map[bool]string{true: "Q", false: "P"}[text[len(text)-1] != 'Q']},
		{"bad character", text[:20] + "B" + text[21:]},
		{"no separator", "AGESECRETKEY"},
		{"truncated", text[:len(text)-8]},
	}
	for _, b := range bad {
		if _, err := decodeSecretKey(b.text); err == nil {
			t.Errorf("%s: decoded without error", b.name)
		}
	}
}

// FuzzOpenSmall checks that openSmall, where it does not defer to
// age.Decrypt, agrees with age.Decrypt on every input.
func FuzzOpenSmall(f *testing.F) {
	x, err := age.ParseX25519Identity("AGE-SECRET-KEY-1EGTZVFFV20835NWYV6270LXYVK2VKNX2MMDKWYKLMGR48UAWX40Q2P2LM0")
	if err != nil {
		f.Fatal(err)
	}
	ids := fastIdentities(f, []*age.X25519Identity{x})
	f.Add(ageEncryptTo(f, []byte("sk-test-key"), x.Recipient()))
	f.Add(ageEncryptTo(f, nil, x.Recipient()))
	f.Add(ageEncryptTo(f, []byte("two"), generateX25519(f).Recipient(), x.Recipient()))
	f.Fuzz(func(t *testing.T, file []byte) {
		got, err := openSmall(file, ids)
		if errors.Is(err, errNotSmall) {
			return
		}
		want, result := ageDecryptAll(file, false, x)
		if (err == nil) != (result == "success") {
			t.Fatalf("openSmall error %v, age.Decrypt result %s", err, result)
		}
		if err == nil && !bytes.Equal(got, want) {
			t.Fatalf("plaintexts differ")
		}
	})
}

// checkHeaderAgrees holds openX25519Header to age.DecryptHeader on one
// header: it may return a file key only where age returns the same one, and
// reports whether it returned one.
func checkHeaderAgrees(t *testing.T, name string, header []byte, fast, reference []age.Identity) bool {
	t.Helper()
	got := openX25519Header(header, fast)
	want, err := age.DecryptHeader(header, reference...)
	if got == nil {
		return false
	}
	if err != nil {
		t.Errorf("%s: openX25519Header returned a file key where age.DecryptHeader fails with %v", name, err)
	} else if !bytes.Equal(got, want) {
		t.Errorf("%s: openX25519Header returned a file key other than age's", name)
	}
	return true
}

// TestX25519HeaderAgreesWithAge runs the single-recipient header path on
// every binary X25519 CCTV vector and on every one-byte change of a header
// that age.Encrypt wrote.
func TestX25519HeaderAgreesWithAge(t *testing.T) {
	entries, err := fs.ReadDir(agetest.Vectors, ".")
	if err != nil {
		t.Fatalf("read CCTV vectors: %v", err)
	}
	var opened int
	for _, entry := range entries {
		data, err := fs.ReadFile(agetest.Vectors, entry.Name())
		if err != nil {
			t.Fatalf("read vector %s: %v", entry.Name(), err)
		}
		v := parseCCTVVector(t, data)
		if !v.onlyX25519 || len(v.identities) == 0 || v.armored {
			continue
		}
		footer := bytes.Index(v.file, []byte("\n---"))
		if footer < 0 {
			continue
		}
		eol := bytes.IndexByte(v.file[footer+1:], '\n')
		if eol < 0 {
			continue
		}
		var reference []age.Identity
		for _, x := range v.identities {
			reference = append(reference, x)
		}
		if checkHeaderAgrees(t, entry.Name(), v.file[:footer+1+eol+1], fastIdentities(t, v.identities), reference) {
			opened++
		}
	}
	// In the corpus of 2026-08, 29 vectors have this layout and a valid
	// header. Far fewer means the path no longer takes them.
	if opened < 20 {
		t.Errorf("openX25519Header opened %d CCTV headers, want at least 20", opened)
	}

	x := generateX25519(t)
	header, err := age.ExtractHeader(bytesReader(ageEncryptTo(t, []byte("payload"), x.Recipient())))
	if err != nil {
		t.Fatal(err)
	}
	fast := fastIdentities(t, []*age.X25519Identity{x})
	if !checkHeaderAgrees(t, "intact", header, fast, []age.Identity{x}) {
		t.Fatal("openX25519Header did not open a header age.Encrypt wrote")
	}
	mutated := make([]byte, len(header))
	for i := range header {
		for _, delta := range []byte{1, 0x20, 0x80} {
			copy(mutated, header)
			mutated[i] ^= delta
			if checkHeaderAgrees(t, fmt.Sprintf("byte %d ^ %#x", i, delta), mutated, fast, []age.Identity{x}) {
				t.Errorf("byte %d ^ %#x: a changed header still opened", i, delta)
			}
		}
	}
}

// TestLowOrderSharesRejected checks every encoding of a low-order point as
// the ephemeral share: u = 0, 1 and p-1, the two points of order 8, the
// encodings of these at or above p, and each with the ignored top bit set.
// Each gives an all-zero shared secret, which age rejects, so the fast
// identity must reject it too.
func TestLowOrderSharesRejected(t *testing.T) {
	x := generateX25519(t)
	fast := fastIdentities(t, []*age.X25519Identity{x})[0]
	valid, err := x.Recipient().Wrap([]byte("0123456789abcdef"))
	if err != nil {
		t.Fatalf("wrap: %v", err)
	}

	p := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 255), big.NewInt(19))
	var points []*big.Int
	for _, u := range []string{
		"0", "1",
		"325606250916557431795983626356110631294008115727848805560023387167927233504",
		"39382357235489614581723060781553021112529911719440698176882885853963445705823",
	} {
		n, _ := new(big.Int).SetString(u, 10)
		points = append(points, n)
	}
	points = append(points, new(big.Int).Sub(p, big.NewInt(1)))
	limit := new(big.Int).Lsh(big.NewInt(1), 255)
	for _, u := range slices.Clone(points) {
		if above := new(big.Int).Add(u, p); above.Cmp(limit) < 0 {
			points = append(points, above)
		}
	}

	for _, u := range points {
		for _, topBit := range []bool{false, true} {
			var share [32]byte
			u.FillBytes(share[:])
			slices.Reverse(share[:]) // little-endian, as X25519 encodes u
			if topBit {
				share[31] |= 0x80
			}
			stanza := &age.Stanza{Type: "X25519", Args: []string{base64.RawStdEncoding.EncodeToString(share[:])}, Body: valid[0].Body}
			_, errAge := x.Unwrap([]*age.Stanza{stanza})
			_, errFast := fast.Unwrap([]*age.Stanza{stanza})
			if errAge == nil || errors.Is(errAge, age.ErrIncorrectIdentity) {
				t.Errorf("share %x: age identity returned %v, want a low order error", share, errAge)
			}
			if errFast == nil || errors.Is(errFast, age.ErrIncorrectIdentity) {
				t.Errorf("share %x: fast identity returned %v, want a low order error", share, errFast)
			}
		}
	}
	if len(points) != 7 {
		t.Errorf("tested %d points, want 7 (5 canonical and 2 encodings above p)", len(points))
	}
}
