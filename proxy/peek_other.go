//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package proxy

import (
	"errors"
	"net"
)

// canAwaitBytes is set where awaitBytes can look at a socket.
const canAwaitBytes = false

// awaitBytes reports errors.ErrUnsupported where no socket call can look at
// waiting bytes without reading them, so a TLS connection is not detached
// (see detachable).
func awaitBytes(net.Conn) (bool, error) { return false, errors.ErrUnsupported }
