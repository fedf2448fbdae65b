package sandbox

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// executable names the running binary by its /proc link rather than its
// path, so a helper is the same build as its parent even after the file on
// disk was replaced by an upgrade.
func executable() (string, error) { return "/proc/self/exe", nil }

// sysProcAttr gives helpers a process group of their own: a Ctrl-C meant for
// the proxy would otherwise kill them under the requests still draining. They
// exit anyway once the proxy is gone and their stdin closes.
func sysProcAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }

// applyLimits caps the helper's memory and volunteers it to the OOM killer.
//
// RLIMIT_DATA counts private writable mappings (since Linux 4.7): brk and
// mmap for C malloc, the Go heap's arenas once they are mapped read-write, and
// thread stacks; Go's PROT_NONE address-space reservations do not count. Past
// the limit an allocation fails with ENOMEM: the Go runtime then kills the
// process, C's malloc returns NULL (PostgreSQL's parser reports "out of
// memory" rather than dying). RLIMIT_AS
// would not do: it counts those reservations, over a gigabyte for an idle Go
// binary, so no useful limit would let a helper start.
func applyLimits(memory uint64) error {
	if memory > 0 {
		var cur unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_DATA, &cur); err != nil {
			return fmt.Errorf("reading RLIMIT_DATA: %w", err)
		}
		// Lowering the hard limit too keeps the helper from raising its
		// own; raising it past the inherited one is not allowed anyway.
		lim := min(memory, cur.Max)
		if err := unix.Setrlimit(unix.RLIMIT_DATA, &unix.Rlimit{Cur: lim, Max: lim}); err != nil {
			return fmt.Errorf("setting RLIMIT_DATA to %d: %w", lim, err)
		}
	}
	// A crash dump of a helper holds the statement it was parsing, and each
	// crash a client provokes would write one.
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		return fmt.Errorf("setting RLIMIT_CORE to 0: %w", err)
	}
	// Best effort: if the host runs out of memory, a helper is the cheapest
	// process to lose. Raising one's own score needs no privilege.
	_ = os.WriteFile("/proc/self/oom_score_adj", []byte("1000"), 0)
	// Best effort too: a helper's work is one client's long statement, and
	// must not take the CPU from the proxy's relaying of every other
	// session (or from the database on the same host). Lowering one's own
	// priority needs no privilege either.
	niceAllThreads(helperNice)
	return nil
}

// niceAllThreads sets every thread of the process to nice n. On Linux a
// priority belongs to a thread (PRIO_PROCESS with who 0 sets the caller's
// alone), and a new thread inherits its creator's: once every thread
// is set, every later one is too. The Go runtime may start threads while
// this runs, so it goes over the list until a pass finds none new.
func niceAllThreads(n int) {
	done := map[int]bool{}
	for range 10 {
		entries, err := os.ReadDir("/proc/self/task")
		if err != nil {
			_ = unix.Setpriority(unix.PRIO_PROCESS, 0, n)
			return
		}
		fresh := false
		for _, e := range entries {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			_ = unix.Setpriority(unix.PRIO_PROCESS, tid, n)
			done[tid], fresh = true, true
		}
		if !fresh {
			return
		}
	}
}

// helperNice is the scheduling priority of helpers: the lowest but one.
const helperNice = 15

// dataProbe reads the size of a process's data mappings, the figure
// RLIMIT_DATA caps (plus the main thread's stack, which is small): the sixth
// field of /proc/<pid>/statm, in pages. The file stays open, so each reading is
// one pread, and refers to that process even once its pid is reused.
type dataProbe struct {
	f   *os.File
	buf [128]byte
}

func newDataProbe(pid int) *dataProbe {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return nil
	}
	return &dataProbe{f: f}
}

func (d *dataProbe) bytes() (uint64, bool) {
	if d == nil {
		return 0, false
	}
	n, err := d.f.ReadAt(d.buf[:], 0)
	if n == 0 || (err != nil && err != io.EOF) {
		return 0, false
	}
	f := bytes.Fields(d.buf[:n])
	if len(f) < 6 {
		return 0, false
	}
	pages, err := strconv.ParseUint(string(f[5]), 10, 64)
	if err != nil {
		return 0, false
	}
	return pages * uint64(os.Getpagesize()), true
}

func (d *dataProbe) close() {
	if d != nil {
		d.f.Close()
	}
}
