package main

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestProcessCPUClockNamesProcess reads this process's CPU time through the
// clock id built from its pid and through CLOCK_PROCESS_CPUTIME_ID.
func TestProcessCPUClockNamesProcess(t *testing.T) {
	var byPid, own unix.Timespec
	if err := unix.ClockGettime(processCPUClock(os.Getpid()), &byPid); err != nil {
		t.Fatalf("clock of pid %d: %v", os.Getpid(), err)
	}
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &own); err != nil {
		t.Fatal(err)
	}
	if diff := time.Duration(own.Nano() - byPid.Nano()); diff < 0 || diff > 50*time.Millisecond {
		t.Errorf("clock of pid %d read %v, CLOCK_PROCESS_CPUTIME_ID %v right after", os.Getpid(),
			time.Duration(byPid.Nano()), time.Duration(own.Nano()))
	}
}

// TestCPUTimeAgreesWithProcStat burns CPU in this process and reads its CPU
// time by pid both ways. The clock must count the work and stay within a
// few clock ticks of /proc/PID/stat. The work goes on until /proc counts
// 300 ms of CPU rather than for 300 ms of wall time, because a loaded
// machine can leave the process waiting for a core.
func TestCPUTimeAgreesWithProcStat(t *testing.T) {
	const tick = 10 * time.Millisecond
	const work = 30 // ticks
	pid := os.Getpid()
	clockBefore, err := cpuTime(pid, tick)
	if err != nil {
		t.Fatal(err)
	}
	ticksBefore, err := cpuTicks(pid)
	if err != nil {
		t.Fatal(err)
	}
	sum := 0
	ticksAfter := ticksBefore
	for deadline := time.Now().Add(20 * time.Second); ticksAfter-ticksBefore < work; {
		if time.Now().After(deadline) {
			t.Fatalf("/proc/%d/stat counted %d ticks of CPU in 20 s of work", pid, ticksAfter-ticksBefore)
		}
		for i := range 100000 {
			sum += i
		}
		if ticksAfter, err = cpuTicks(pid); err != nil {
			t.Fatal(err)
		}
	}
	clockAfter, _ := cpuTime(pid, tick)
	byClock := clockAfter - clockBefore
	byStat := time.Duration(ticksAfter-ticksBefore) * tick
	if byClock < (work-5)*tick {
		t.Errorf("the CPU-time clock counted %v for %v of work (sum %d)", byClock, work*tick, sum)
	}
	if diff := (byClock - byStat).Abs(); diff > 5*tick {
		t.Errorf("the CPU-time clock counted %v, /proc/PID/stat %v", byClock, byStat)
	}
}
