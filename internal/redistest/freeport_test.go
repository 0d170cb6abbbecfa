package redistest

import "testing"

// TestFreePortNeverRepeats checks that FreePort returns a new port each
// time. Without the check for ports returned before, some port repeated
// within 500 calls in each of three runs on Linux.
func TestFreePortNeverRepeats(t *testing.T) {
	seen := map[int]int{}
	for i := range 500 {
		port := FreePort(t)
		if j, ok := seen[port]; ok {
			t.Fatalf("call %d returned port %d, as call %d did", i, port, j)
		}
		seen[port] = i
	}
}
