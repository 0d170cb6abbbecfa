package redistest

import "testing"

// TestFreePortNeverRepeats checks that FreePort returns a new port each
// time. Picked at random from the kernel's ephemeral range, 500 ports
// repeat at least once in most runs.
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
