package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cpuTime returns the CPU time pid has used, all its threads together,
// those that have exited included. It reads the process's CPU-time clock,
// which counts nanoseconds. The fallback, /proc/PID/stat, counts clock
// ticks of usually 10 ms, which is 20 µs per stream in a window of 500.
func cpuTime(pid int, tick time.Duration) (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(processCPUClock(pid), &ts); err == nil {
		return time.Duration(ts.Nano()), nil
	}
	t, err := cpuTicks(pid)
	return time.Duration(t) * tick, err
}

// processCPUClock returns the clock id of pid's CPU time, which
// clock_getcpuclockid(3) also returns: the kernel's
// MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED).
func processCPUClock(pid int) int32 { return int32(^pid)<<3 | 2 }

// cpuTicks returns utime+stime of pid, in clock ticks, from /proc/PID/stat.
func cpuTicks(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces, so
	// fields are counted from the last ')'. utime and stime are fields 14
	// and 15, the 12th and 13th after it.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return utime + stime, nil
}

// rssKiB returns the resident set size of pid from /proc/PID/status.
func rssKiB(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// cpuWindow measures the CPU time the -pid processes spend in a window.
type cpuWindow struct {
	pids  pidFlags
	tick  time.Duration
	start []time.Duration
}

func startCPU(o options) (*cpuWindow, error) {
	w := &cpuWindow{pids: o.pids, tick: time.Second / time.Duration(o.clkTck)}
	for _, p := range o.pids {
		t, err := cpuTime(p.pid, w.tick)
		if err != nil {
			return nil, err
		}
		w.start = append(w.start, t)
	}
	return w, nil
}

// stop fills res with each process's CPU time per completed operation.
func (w *cpuWindow) stop(res *result, ops int) error {
	if ops == 0 {
		return nil
	}
	for i, p := range w.pids {
		t, err := cpuTime(p.pid, w.tick)
		if err != nil {
			return err
		}
		perOp := float64(t-w.start[i]) / float64(ops) / float64(time.Microsecond)
		if i == 0 {
			res.CPUPerOp = perOp
			continue
		}
		if res.OtherCPU == nil {
			res.OtherCPU = map[string]float64{}
		}
		res.OtherCPU[p.name] = perOp
	}
	return nil
}
