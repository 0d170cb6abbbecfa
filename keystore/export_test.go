package keystore

import "github.com/byokproxy/byokproxy/mailbox"

// Bind exposes bind to the external tests, which check stored payloads.
func (ids *Identities) Bind(key []byte, id mailbox.ID, prov string) []byte {
	return ids.bind(key, id, prov)
}
