//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"syscall"
)

// canAwaitBytes is set where awaitBytes can look at a socket.
const canAwaitBytes = true

// awaitBytes waits, within conn's read deadline, until the client has sent
// something or closed its side. It reads nothing, so that the HTTP server
// reads every byte later through conn, a TLS connection's records
// included. It reports whether bytes wait to be read, and false when the
// client closed its side or the wait failed.
func awaitBytes(conn net.Conn) (bool, error) {
	if t, ok := conn.(*tls.Conn); ok {
		conn = t.NetConn()
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false, errors.ErrUnsupported
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false, err
	}
	var (
		buf     [1]byte
		n       int
		peekErr error
	)
	err = raw.Read(func(fd uintptr) bool {
		for {
			// Go's sockets are non-blocking, so a peek with nothing to
			// read fails with EAGAIN and Read waits for the socket.
			n, _, peekErr = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK)
			if peekErr != syscall.EINTR {
				break
			}
		}
		return peekErr != syscall.EAGAIN
	})
	if err != nil {
		return false, err
	}
	if peekErr != nil {
		return false, peekErr
	}
	return n > 0, nil
}
