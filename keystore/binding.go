package keystore

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"

	"github.com/byokproxy/byokproxy/mailbox"
)

// The payload of a stored ciphertext binds the key to its owner:
//
//	byokproxy-key/v2\n<mailbox>\n<provider>\n<tag>\n<key>
//
// tag is the unpadded base64url HMAC-SHA256 of the payload without it
// (header, mailbox, provider and key, each line ending in \n but the key's),
// under a key derived from the identity. age encrypts to a public recipient,
// so anyone who can write Redis could encrypt a payload of their own. The
// tag makes such a payload fail, as the mailbox and provider make a copy
// from another mailbox fail. Mailbox ids and provider names never contain
// a newline.
const payloadHeader = "byokproxy-key/v2\n"

// payloadHeaderV1 starts payloads written before the tag. They are rejected,
// because anyone could have written them, and identity rewrap with
// --tag-untagged converts them.
const payloadHeaderV1 = "byokproxy-key/v1\n"

// bindingInfo is the HKDF info string of the tag key.
const bindingInfo = "byokproxy-key/v2 binding tag"

var tagEncoding = base64.RawURLEncoding.Strict()

// bindingKey derives the tag key of an identity's scalar.
func bindingKey(scalar []byte) ([]byte, error) {
	return hkdf.Key(sha256.New, scalar, nil, bindingInfo, sha256.Size)
}

// bindingTag returns the tag of key for mailbox id and provider prov.
func bindingTag(macKey, key []byte, id mailbox.ID, prov string) []byte {
	h := hmac.New(sha256.New, macKey)
	h.Write([]byte(payloadHeader))
	h.Write([]byte(id))
	h.Write([]byte{'\n'})
	h.Write([]byte(prov))
	h.Write([]byte{'\n'})
	h.Write(key)
	return h.Sum(nil)
}

// bind returns the payload of key for mailbox id and provider prov, tagged
// with the first identity's key, the one whose recipient encrypts it.
func (ids *Identities) bind(key []byte, id mailbox.ID, prov string) []byte {
	tag := bindingTag(ids.bindingKeys[0], key, id, prov)
	b := make([]byte, 0, len(payloadHeader)+len(id)+len(prov)+tagEncoding.EncodedLen(len(tag))+len(key)+3)
	b = append(b, payloadHeader...)
	b = append(b, id...)
	b = append(b, '\n')
	b = append(b, prov...)
	b = append(b, '\n')
	b = tagEncoding.AppendEncode(b, tag)
	b = append(b, '\n')
	return append(b, key...)
}

// unbind checks the payload's owner and tag and returns its key, which shares
// plain's memory. A tag made with any of the identities' keys passes, so
// payloads written before an identity rotation still open until a rewrap.
func (ids *Identities) unbind(plain []byte, id mailbox.ID, prov string) (*Secret, error) {
	if bytes.HasPrefix(plain, []byte(payloadHeaderV1)) {
		return nil, fmt.Errorf("%w: the payload has no tag, as older versions wrote it; run byokproxy identity rewrap --tag-untagged once after the upgrade", ErrWrongBinding)
	}
	owner, gotProv, tagText, key, ok := splitPayload(plain)
	if !ok || string(owner) != string(id) || string(gotProv) != prov {
		return nil, ErrWrongBinding
	}
	tag := make([]byte, sha256.Size)
	if n, err := tagEncoding.Decode(tag, tagText); err != nil || n != len(tag) {
		return nil, ErrWrongBinding
	}
	for _, macKey := range ids.bindingKeys {
		if hmac.Equal(tag, bindingTag(macKey, key, id, prov)) {
			return NewSecret(key), nil
		}
	}
	return nil, ErrWrongBinding
}

// splitPayload returns the fields of a payload in the current format.
func splitPayload(plain []byte) (owner, prov, tag, key []byte, ok bool) {
	rest, ok := bytes.CutPrefix(plain, []byte(payloadHeader))
	if !ok {
		return nil, nil, nil, nil, false
	}
	owner, rest, ok1 := bytes.Cut(rest, []byte{'\n'})
	prov, rest, ok2 := bytes.Cut(rest, []byte{'\n'})
	tag, key, ok3 := bytes.Cut(rest, []byte{'\n'})
	return owner, prov, tag, key, ok1 && ok2 && ok3
}

// unbindV1 checks the owner of a payload written before the tag and returns
// its key, for identity rewrap to bind again.
func unbindV1(plain []byte, id mailbox.ID, prov string) ([]byte, error) {
	rest, ok := bytes.CutPrefix(plain, []byte(payloadHeaderV1))
	if !ok {
		return nil, ErrWrongBinding
	}
	owner, rest, ok1 := bytes.Cut(rest, []byte{'\n'})
	gotProv, key, ok2 := bytes.Cut(rest, []byte{'\n'})
	if !ok1 || !ok2 || string(owner) != string(id) || string(gotProv) != prov {
		return nil, ErrWrongBinding
	}
	return key, nil
}
