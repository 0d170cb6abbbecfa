package keystore

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"io"
	"testing"

	"filippo.io/age"
	"github.com/cloudflare/circl/dh/x25519"
)

// benchPayload is a stored key payload of typical size.
var benchPayload = []byte("byokproxy-key/v1\nalice@example.com\nopenai\nsk-proj-Qx3v9T2mB7kLp4RzW8nY1cD6fH0jS5aE-uVb2XoG7iKq9MtN3rZ8wPy4LsJ6dF1hC0eA5gU")

// BenchmarkX25519ScalarMult is the one scalar multiplication an X25519
// unwrap cannot avoid, with crypto/ecdh: the unit in which the benchmarks
// state the cost of decryption.
func BenchmarkX25519ScalarMult(b *testing.B) {
	private, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	peer, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	public := peer.PublicKey()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := private.ECDH(public); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkX25519Circl is the same scalar multiplication with circl, as
// the fast identity does it.
func BenchmarkX25519Circl(b *testing.B) {
	var secret, peer, public, shared x25519.Key
	if _, err := rand.Read(secret[:]); err != nil {
		b.Fatal(err)
	}
	if _, err := rand.Read(peer[:]); err != nil {
		b.Fatal(err)
	}
	x25519.KeyGen(&public, &peer)
	b.ReportAllocs()
	for b.Loop() {
		if !x25519.Shared(&shared, &secret, &public) {
			b.Fatal("low order point")
		}
	}
}

// BenchmarkDecryptKey decrypts one stored key payload: with age.Decrypt and
// age's identity, with age.Decrypt and the fast identity, and with openSmall
// and the fast identity.
func BenchmarkDecryptKey(b *testing.B) {
	x := generateX25519(b)
	file := ageEncryptTo(b, benchPayload, x.Recipient())
	fast := fastIdentities(b, []*age.X25519Identity{x})

	// age.Decrypt alone, with age's identity and its 64 KiB STREAM reader:
	// the cost before the fast identity and openSmall.
	b.Run("age.Decrypt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			r, err := age.Decrypt(bytes.NewReader(file), x)
			if err != nil {
				b.Fatal(err)
			}
			plain, err := io.ReadAll(r)
			if err != nil {
				b.Fatal(err)
			}
			clear(plain)
		}
	})
	b.Run("decrypt+age-identity", func(b *testing.B) {
		ids := &Identities{ids: []age.Identity{x}}
		b.ReportAllocs()
		for b.Loop() {
			plain, err := ids.decrypt(file)
			if err != nil {
				b.Fatal(err)
			}
			clear(plain)
		}
	})
	b.Run("decrypt+fast-identity", func(b *testing.B) {
		ids := &Identities{ids: fast}
		b.ReportAllocs()
		for b.Loop() {
			plain, err := ids.decrypt(file)
			if err != nil {
				b.Fatal(err)
			}
			clear(plain)
		}
	})
	b.Run("openSmall+fast-identity", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			plain, err := openSmall(file, fast)
			if err != nil {
				b.Fatal(err)
			}
			clear(plain)
		}
	})
}

// benchHeader returns the header of a stored key's ciphertext and the fast
// identity that opens it.
func benchHeader(b *testing.B) ([]byte, []age.Identity) {
	b.Helper()
	x := generateX25519(b)
	file := ageEncryptTo(b, benchPayload, x.Recipient())
	header, err := age.ExtractHeader(bytesReader(file))
	if err != nil {
		b.Fatal(err)
	}
	return header, fastIdentities(b, []*age.X25519Identity{x})
}

// BenchmarkDecryptHeader isolates age.DecryptHeader with the fast identity:
// header parsing, the unwrap and the header MAC.
func BenchmarkDecryptHeader(b *testing.B) {
	header, fast := benchHeader(b)
	b.ReportAllocs()
	for b.Loop() {
		fileKey, err := age.DecryptHeader(header, fast...)
		if err != nil {
			b.Fatal(err)
		}
		clear(fileKey)
	}
}

// BenchmarkX25519Header measures the single-recipient header path that
// openSmall takes before age.DecryptHeader: the unwrap and the header MAC.
func BenchmarkX25519Header(b *testing.B) {
	header, fast := benchHeader(b)
	b.ReportAllocs()
	for b.Loop() {
		fileKey := openX25519Header(header, fast)
		if fileKey == nil {
			b.Fatal("header not opened")
		}
		clear(fileKey)
	}
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }
