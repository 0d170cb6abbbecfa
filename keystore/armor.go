package keystore

import (
	"io"
	"strings"

	"filippo.io/age/armor"
)

func armorReader(r io.Reader) io.Reader {
	return armor.NewReader(r)
}

// Armor returns the PEM-armored form of a binary age ciphertext, as the age
// command writes with -a.
func Armor(ciphertext []byte) (string, error) {
	var b strings.Builder
	w := armor.NewWriter(&b)
	if _, err := w.Write(ciphertext); err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	return b.String(), nil
}
