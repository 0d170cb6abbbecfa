//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package proxy

import (
	"errors"
	"net"
)

// awaitBytes reports errors.ErrUnsupported where no socket call can look at
// waiting bytes without reading them. A TLS connection then goes back to
// the server as soon as its stream ends.
func awaitBytes(net.Conn) (bool, error) { return false, errors.ErrUnsupported }
