package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"filippo.io/age"
)

// Identities are the age X25519 identities of the proxy. The first one's
// recipient encrypts every key written, and all of them decrypt, so an operator
// can add a new identity in front, rewrap, and later drop the old one.
type Identities struct {
	ids       []age.Identity
	x25519    []*age.X25519Identity
	recipient *age.X25519Recipient
	// bindingKeys tag stored payloads, one derived from each identity.
	bindingKeys [][]byte
}

// ParseIdentities reads AGE-SECRET-KEY-1 lines (comments and blank lines are
// skipped). Only X25519 identities are accepted.
func ParseIdentities(r io.Reader) (*Identities, error) {
	parsed, err := age.ParseIdentities(r)
	if err != nil {
		return nil, fmt.Errorf("parse age identities: %w", err)
	}
	ids := &Identities{}
	for _, id := range parsed {
		x, ok := id.(*age.X25519Identity)
		if !ok {
			return nil, errors.New("parse age identities: only X25519 identities (AGE-SECRET-KEY-1...) are supported")
		}
		if err := ids.add(x); err != nil {
			return nil, err
		}
	}
	return ids, nil
}

// LoadIdentities reads the identity file at path.
func LoadIdentities(path string) (*Identities, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read identity file: %w", err)
	}
	defer clear(data)
	return ParseIdentities(bytes.NewReader(data))
}

// GenerateIdentities returns one fresh identity, for --dev mode and tests.
func GenerateIdentities() (*Identities, error) {
	x, err := age.GenerateX25519Identity()
	if err != nil {
		return nil, err
	}
	ids := &Identities{}
	if err := ids.add(x); err != nil {
		return nil, err
	}
	return ids, nil
}

func (ids *Identities) add(x *age.X25519Identity) error {
	scalar, err := decodeSecretKey(x.String())
	if err != nil {
		return err
	}
	bindingKey, err := bindingKey(scalar)
	clear(scalar)
	if err != nil {
		return err
	}
	if ids.recipient == nil {
		ids.recipient = x.Recipient()
	}
	id, err := newFastIdentity(x)
	if err != nil {
		id = x // age's own identity opens the same files, only slower
	}
	ids.ids = append(ids.ids, id)
	ids.x25519 = append(ids.x25519, x)
	ids.bindingKeys = append(ids.bindingKeys, bindingKey)
	return nil
}

// Recipient returns the recipient that new ciphertexts are encrypted to.
func (ids *Identities) Recipient() *age.X25519Recipient {
	return ids.recipient
}

// Len returns the number of identities.
func (ids *Identities) Len() int {
	return len(ids.ids)
}

// SecretText returns the identity file text, for writing a generated
// identity. It holds secret keys: write it only to a file of mode 0600.
func (ids *Identities) SecretText() string {
	var b bytes.Buffer
	for _, x := range ids.x25519 {
		b.WriteString(x.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// encrypt returns the age ciphertext of plaintext, in the binary age format.
func (ids *Identities) encrypt(plaintext []byte) ([]byte, error) {
	var out bytes.Buffer
	w, err := age.Encrypt(&out, ids.recipient)
	if err != nil {
		return nil, fmt.Errorf("age encrypt: %w", err)
	}
	if _, err := w.Write(plaintext); err != nil {
		return nil, fmt.Errorf("age encrypt: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("age encrypt: %w", err)
	}
	return out.Bytes(), nil
}

// maxPlaintext bounds a decrypted payload: a key with its binding is a few
// hundred bytes.
const maxPlaintext = 4096

// decrypt returns the plaintext of an age ciphertext (binary or armored).
func (ids *Identities) decrypt(ciphertext []byte) ([]byte, error) {
	plain, err := openSmall(ciphertext, ids.ids)
	switch {
	case err == nil && len(plain) > maxPlaintext:
		clear(plain)
		return nil, errors.New("age decrypt: payload too large")
	case err == nil:
		return plain, nil
	case !errors.Is(err, errNotSmall):
		return nil, fmt.Errorf("age decrypt: %w", err)
	}
	src := io.Reader(bytes.NewReader(ciphertext))
	if bytes.HasPrefix(ciphertext, []byte("-----BEGIN AGE ENCRYPTED FILE-----")) {
		src = armorReader(src)
	}
	r, err := age.Decrypt(src, ids.ids...)
	if err != nil {
		return nil, fmt.Errorf("age decrypt: %w", err)
	}
	buf := make([]byte, 0, 256)
	for {
		if len(buf) == cap(buf) {
			if len(buf) >= maxPlaintext {
				clear(buf)
				return nil, errors.New("age decrypt: payload too large")
			}
			grown := make([]byte, len(buf), 2*cap(buf))
			copy(grown, buf)
			clear(buf)
			buf = grown
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			clear(buf)
			return nil, fmt.Errorf("age decrypt: %w", err)
		}
	}
}
