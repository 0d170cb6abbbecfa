// Command scalarmult measures the CPU time of one X25519 scalar
// multiplication (crypto/ecdh), the one step of decrypting a stored key
// that no implementation can skip, and prints it as a benchmark result.
package main

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"syscall"
	"time"
)

func main() {
	duration := flag.Duration("duration", time.Second, "how long to measure")
	round := flag.Int("round", 0, "round number recorded in the result")
	flag.Parse()

	private, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		fail(err)
	}
	peer, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		fail(err)
	}
	public := peer.PublicKey()

	before := cpuTime()
	deadline := time.Now().Add(*duration)
	ops := 0
	for time.Now().Before(deadline) {
		for range 100 {
			if _, err := private.ECDH(public); err != nil {
				fail(err)
			}
		}
		ops += 100
	}
	perOp := float64(cpuTime()-before) / float64(ops) / float64(time.Microsecond)
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"target": "x25519", "phase": "scalarmult", "round": *round,
		"sent": ops, "ok": ops, "cpu_us_per_op": perOp,
	})
}

// cpuTime returns the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		fail(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "scalarmult:", err)
	os.Exit(1)
}
