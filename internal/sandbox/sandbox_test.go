package sandbox_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/sandbox"
)

const helperName = "sandbox-test"

// TestMain makes the test binary its own helper.
func TestMain(m *testing.M) {
	// Set through Config.Env, so only ever in a child.
	if os.Getenv("SANDBOX_TEST_DIE_AT_START") != "" {
		fmt.Fprintln(os.Stderr, "dying at start, as asked")
		os.Exit(5)
	}
	if os.Getenv("SANDBOX_TEST_HANG_AT_START") != "" {
		time.Sleep(time.Hour)
	}
	sandbox.Serve(helperName, handle)
	if os.Getenv("RLSPROXY_SANDBOX") != "" {
		// Started for a name this binary does not serve: running the tests
		// here would start helpers of its own, and so on.
		fmt.Fprintln(os.Stderr, "not a helper for", os.Getenv("RLSPROXY_SANDBOX"))
		os.Exit(7)
	}
	os.Exit(m.Run())
}

// info is what a helper reports about itself.
type info struct {
	PID         int
	GOMAXPROCS  int
	OOMScoreAdj string
	VmRSSKB     int
	VmDataKB    int
}

// handle interprets a request as "command:argument"; everything after a space
// in the argument is ignored, so a request can carry a marker the helper never
// prints.
func handle(req []byte) []byte {
	if rest, ok := bytes.CutPrefix(req, []byte("echo:")); ok {
		return rest
	}
	cmd, arg, _ := strings.Cut(string(req), ":")
	cmd, _, _ = strings.Cut(cmd, " ")
	arg, _, _ = strings.Cut(arg, " ")
	pid := []byte(strconv.Itoa(os.Getpid()))
	switch cmd {
	case "pid":
		return pid
	case "info":
		b, _ := json.Marshal(info{
			PID:         os.Getpid(),
			GOMAXPROCS:  runtime.GOMAXPROCS(0),
			OOMScoreAdj: readTrimmed("/proc/self/oom_score_adj"),
			VmRSSKB:     procStatus("/proc/self/status", "VmRSS"),
			VmDataKB:    procStatus("/proc/self/status", "VmData"),
		})
		return b
	case "env":
		return []byte(os.Getenv(arg))
	case "sleep":
		d, _ := time.ParseDuration(arg)
		time.Sleep(d)
		return pid
	case "exit":
		code, _ := strconv.Atoi(arg)
		os.Exit(code)
	case "segv", "kill":
		sig := syscall.SIGSEGV
		if cmd == "kill" {
			sig = syscall.SIGKILL
		}
		self, _ := os.FindProcess(os.Getpid())
		self.Signal(sig)
		time.Sleep(time.Hour)
	case "panic":
		panic(arg)
	case "alloc":
		n, _ := strconv.Atoi(arg)
		b := make([]byte, n)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		return []byte("allocated " + strconv.Itoa(len(b)))
	case "big":
		return make([]byte, 2<<20)
	case "garbage":
		os.NewFile(4, "responses").WriteString("this is not a frame\n")
		time.Sleep(time.Hour)
	case "print":
		// What libpg_query does on a FATAL error: not an answer.
		os.Stdout.WriteString("Terminating process due to FATAL error\n")
		return []byte("printed")
	case "nice":
		// Every thread's: a priority is a thread's own on Linux, and the
		// parse may run on any of them.
		tasks, _ := os.ReadDir("/proc/self/task")
		seen := map[string]bool{}
		var nices []string
		for _, task := range tasks {
			stat, err := os.ReadFile("/proc/self/task/" + task.Name() + "/stat")
			if err != nil {
				continue
			}
			// Fields after the command's closing parenthesis; nice is
			// field 19, the 17th of these.
			fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
			if n := fields[16]; !seen[n] {
				seen[n] = true
				nices = append(nices, n)
			}
		}
		return []byte(strings.Join(nices, ","))
	case "spam":
		n, _ := strconv.Atoi(arg)
		os.Stderr.Write(bytes.Repeat([]byte("spam\n"), n/5))
		return pid
	}
	return []byte("unknown command")
}

func readTrimmed(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// procStatus returns a kB figure from /proc/<pid>/status, or 0 outside Linux.
func procStatus(path, field string) int {
	b, _ := os.ReadFile(path)
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return n
		}
	}
	return 0
}

func newPool(t testing.TB, cfg sandbox.Config) *sandbox.Pool {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = helperName
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	p := sandbox.New(cfg)
	t.Cleanup(func() { p.Close() })
	return p
}

func do(t testing.TB, p *sandbox.Pool, req string) string {
	t.Helper()
	resp, err := p.Do(context.Background(), []byte(req))
	if err != nil {
		t.Fatalf("Do(%.20q): %v", req, err)
	}
	return string(resp)
}

// goDo is do for goroutines other than the test's, where t.Fatal is not
// allowed.
func goDo(t testing.TB, p *sandbox.Pool, req string) string {
	resp, err := p.Do(context.Background(), []byte(req))
	if err != nil {
		t.Errorf("Do(%.20q): %v", req, err)
	}
	return string(resp)
}

func pidOf(t testing.TB, p *sandbox.Pool) int {
	t.Helper()
	pid, err := strconv.Atoi(do(t, p, "pid"))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func failure(t testing.TB, err error, want sandbox.Kind) *sandbox.Failure {
	t.Helper()
	var f *sandbox.Failure
	if !errors.As(err, &f) {
		t.Fatalf("got error %v, want a *sandbox.Failure of kind %v", err, want)
	}
	if f.Kind != want {
		t.Fatalf("got %v, want kind %v", err, want)
	}
	return f
}

// alive reports whether pid names a process, zombies included: a pool must
// have reaped what it killed.
func alive(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	return p.Signal(syscall.Signal(0)) == nil
}

// children counts this process's child processes, or returns -1 outside Linux.
func children() int {
	if runtime.GOOS != "linux" {
		return -1
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return -1
	}
	me := strconv.Itoa(os.Getpid())
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(fields) > 1 && fields[1] == me {
			n++
		}
	}
	return n
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// Helpers run at a low priority: a long statement's parse must not take
// the CPU from the relaying of every other session.
func TestHelperPriority(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("priorities are set on Linux only")
	}
	p := newPool(t, sandbox.Config{})
	if got := do(t, p, "nice:"); got != "15" {
		t.Fatalf("helper threads' nice %s, want 15 for every one", got)
	}
}

func TestEcho(t *testing.T) {
	p := newPool(t, sandbox.Config{})
	big := strings.Repeat("x", 900<<10) // several times a pipe's buffer
	for _, msg := range []string{"", "hello", big} {
		if got := do(t, p, "echo:"+msg); got != msg {
			t.Errorf("echo of %d bytes came back as %d bytes", len(msg), len(got))
		}
	}
	// What a helper prints is never taken for its answer.
	if got := do(t, p, "print:"); got != "printed" {
		t.Errorf("a helper that printed answered %q", got)
	}
	// A noisy helper must not stall on a full stderr pipe.
	do(t, p, "spam:1000000")
	if got := do(t, p, "echo:after spam"); got != "after spam" {
		t.Errorf("got %q", got)
	}
}

func TestHelperEnvironment(t *testing.T) {
	p := newPool(t, sandbox.Config{
		Env: []string{"SANDBOX_TEST_VAR=from-config", "RLSPROXY_SANDBOX=someone-else"},
	})
	var in info
	if err := json.Unmarshal([]byte(do(t, p, "info")), &in); err != nil {
		t.Fatal(err)
	}
	if in.GOMAXPROCS != 1 {
		t.Errorf("GOMAXPROCS = %d in the helper, want 1", in.GOMAXPROCS)
	}
	if runtime.GOOS == "linux" && in.OOMScoreAdj != "1000" {
		t.Errorf("oom_score_adj = %q in the helper, want 1000", in.OOMScoreAdj)
	}
	if got := do(t, p, "env:SANDBOX_TEST_VAR"); got != "from-config" {
		t.Errorf("Config.Env did not reach the helper: got %q", got)
	}
	if got := do(t, p, "env:RLSPROXY_SANDBOX"); got != "" {
		t.Errorf("the helper kept RLSPROXY_SANDBOX=%q for its own children", got)
	}
}

func TestCrash(t *testing.T) {
	tests := []struct {
		req    string
		status string // in Failure.Status
		err    string // in Failure.Err
	}{
		{"segv", "exit status 2", ""}, // the Go runtime turns the signal into exit 2
		{"kill", "signal: killed", ""},
		{"exit:3", "exit status 3", ""},
		{"panic:boom", "exit status 2", ""},
		{"big", "signal: killed", "malformed framing"},
		{"garbage", "signal: killed", "malformed framing"},
	}
	p := newPool(t, sandbox.Config{Workers: 1})
	for _, tc := range tests {
		t.Run(tc.req, func(t *testing.T) {
			before := pidOf(t, p)
			_, err := p.Do(context.Background(), []byte(tc.req))
			f := failure(t, err, sandbox.Crashed)
			if f.PID != before || !strings.Contains(f.Status, tc.status) {
				t.Errorf("got pid %d, status %q; want pid %d, status %q", f.PID, f.Status, before, tc.status)
			}
			if tc.err != "" && (f.Err == nil || !strings.Contains(f.Err.Error(), tc.err)) {
				t.Errorf("got %v, want it to say %q", err, tc.err)
			}
			if alive(before) {
				t.Errorf("process %d outlived its crash", before)
			}
			if after := pidOf(t, p); after == before {
				t.Errorf("the next request went to the crashed process %d", before)
			}
		})
	}
}

func TestCrashSparesOthers(t *testing.T) {
	p := newPool(t, sandbox.Config{Workers: 2})
	done := make(chan error, 1)
	go func() {
		_, err := p.Do(context.Background(), []byte("sleep:400ms"))
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	_, err := p.Do(context.Background(), []byte("segv"))
	failure(t, err, sandbox.Crashed)
	if err := <-done; err != nil {
		t.Errorf("a request on another process failed: %v", err)
	}
}

func TestTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	p := newPool(t, sandbox.Config{Workers: 1, Timeout: timeout})
	before := pidOf(t, p)
	start := time.Now()
	_, err := p.Do(context.Background(), []byte("sleep:10s"))
	took := time.Since(start)
	f := failure(t, err, sandbox.TimedOut)
	if took < timeout || took > timeout+2*time.Second {
		t.Errorf("timed out after %v, want about %v", took, timeout)
	}
	if f.PID != before || f.Status != "signal: killed" {
		t.Errorf("got pid %d, status %q; want pid %d killed", f.PID, f.Status, before)
	}
	if alive(before) {
		t.Errorf("process %d outlived its timeout", before)
	}
	if after := pidOf(t, p); after == before {
		t.Errorf("the next request went to the killed process %d", before)
	}
}

func TestCanceled(t *testing.T) {
	p := newPool(t, sandbox.Config{Workers: 1})
	before := pidOf(t, p)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := p.Do(ctx, []byte("sleep:10s"))
	f := failure(t, err, sandbox.Canceled)
	if !errors.Is(err, context.DeadlineExceeded) || f.PID != before {
		t.Errorf("got %v, want the deadline, for pid %d", err, before)
	}
	if alive(before) {
		t.Errorf("process %d outlived the canceled request", before)
	}
	pidOf(t, p)
}

func TestMemoryLimit(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("RLIMIT_DATA is enforced on Linux only")
	}
	// The race detector maps its shadow memory read-write at start, some
	// 400 MiB that RLIMIT_DATA counts: the budget under test comes on top.
	var base uint64
	if raceEnabled() {
		var in info
		if err := json.Unmarshal([]byte(do(t, newPool(t, sandbox.Config{}), "info")), &in); err != nil {
			t.Fatal(err)
		}
		base = uint64(in.VmDataKB) << 10
		t.Logf("race detector: %d MiB of data mappings at start, added to the limits", base>>20)
	}
	const MiB = 1 << 20
	tests := []struct {
		limit uint64
		req   string
		ok    bool
	}{
		{256 * MiB, "alloc:" + strconv.Itoa(2<<30), false},
		{256 * MiB, "alloc:" + strconv.Itoa(64*MiB), true},
		{128 * MiB, "echo:hello", true},
		{128 * MiB, "alloc:" + strconv.Itoa(16*MiB), true},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%dMiB/%s", tc.limit/MiB, tc.req), func(t *testing.T) {
			p := newPool(t, sandbox.Config{MemoryLimit: base + tc.limit})
			_, err := p.Do(context.Background(), []byte(tc.req))
			if tc.ok && err != nil {
				t.Fatalf("failed under the limit: %v", err)
			}
			if !tc.ok {
				failure(t, err, sandbox.Crashed)
			}
		})
	}
}

func TestRetireSpentHelper(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("data mappings are measured on Linux only")
	}
	if raceEnabled() {
		t.Skip("the race detector's shadow memory multiplies a heap's growth several times over")
	}
	const MiB = 1 << 20
	tests := []struct {
		req     string
		retired bool
	}{
		{"alloc:" + strconv.Itoa(16*MiB), false},
		{"alloc:" + strconv.Itoa(160*MiB), true},
	}
	for _, tc := range tests {
		t.Run(tc.req, func(t *testing.T) {
			p := newPool(t, sandbox.Config{Workers: 1, MemoryLimit: 256 * MiB})
			before := pidOf(t, p)
			do(t, p, tc.req)
			if retired := pidOf(t, p) != before; retired != tc.retired {
				t.Errorf("helper retired: %v, want %v", retired, tc.retired)
			}
		})
	}
}

func TestConcurrency(t *testing.T) {
	const workers, requests, sleep = 2, 8, 200 * time.Millisecond
	p := newPool(t, sandbox.Config{Workers: workers})
	// Warm both processes, so the timing below is the queue's alone.
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() { goDo(t, p, "sleep:50ms") })
	}
	wg.Wait()

	stop := make(chan struct{})
	most := make(chan int)
	go func() {
		m := 0
		for {
			m = max(m, children())
			select {
			case <-stop:
				most <- m
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	var mu sync.Mutex
	pids := map[string]bool{}
	start := time.Now()
	for range requests {
		wg.Go(func() {
			pid := goDo(t, p, "sleep:"+sleep.String())
			mu.Lock()
			pids[pid] = true
			mu.Unlock()
		})
	}
	wg.Wait()
	took := time.Since(start)
	close(stop)
	m := <-most

	want := requests / workers * sleep
	if took < want || took > want+time.Second {
		t.Errorf("%d requests of %v on %d workers took %v, want about %v", requests, sleep, workers, took, want)
	}
	if len(pids) > workers || m > workers {
		t.Errorf("%d processes answered, at most %d alive at once; want at most %d", len(pids), m, workers)
	}
	t.Logf("took %v; %d processes answered, at most %d alive at once", took, len(pids), m)
}

func TestQueueOrder(t *testing.T) {
	p := newPool(t, sandbox.Config{Workers: 1})
	pidOf(t, p)
	go p.Do(context.Background(), []byte("sleep:1s"))
	time.Sleep(50 * time.Millisecond)
	order := make(chan int, 3)
	for i := range 3 {
		go func() {
			goDo(t, p, "pid")
			order <- i
		}()
		// So that they queue in this order.
		for deadline := time.Now().Add(5 * time.Second); sandbox.Waiting(p) < i+1; {
			if time.Now().After(deadline) {
				t.Fatalf("request %d never queued", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	for want := range 3 {
		if got := <-order; got != want {
			t.Fatalf("request %d finished in place %d", got, want)
		}
	}
}

func TestBusy(t *testing.T) {
	p := newPool(t, sandbox.Config{Workers: 1})
	pidOf(t, p)
	go p.Do(context.Background(), []byte("sleep:500ms"))
	time.Sleep(50 * time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := p.Do(ctx, []byte("pid"))
	failure(t, err, sandbox.Busy)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want it to wrap the deadline", err)
	}
	if took := time.Since(start); took > 300*time.Millisecond {
		t.Errorf("Busy after %v, want it at the 50ms deadline", took)
	}

	done, cancelDone := context.WithCancel(context.Background())
	cancelDone()
	_, err = p.Do(done, []byte("pid"))
	failure(t, err, sandbox.Busy)

	// The slot given up by the waiter is not lost.
	if pid := pidOf(t, p); pid == 0 {
		t.Error("no pid")
	}
}

func TestTooLarge(t *testing.T) {
	p := newPool(t, sandbox.Config{MaxRequest: 16})
	_, err := p.Do(context.Background(), []byte("echo:0123456789ab"))
	failure(t, err, sandbox.TooLarge)
	if got := do(t, p, "echo:0123456789a"); got != "0123456789a" {
		t.Errorf("a request of exactly MaxRequest bytes: got %q", got)
	}
}

func TestClose(t *testing.T) {
	p := newPool(t, sandbox.Config{Workers: 2})
	var wg sync.WaitGroup
	pids := make([]int, 2)
	for i := range pids {
		wg.Go(func() { pids[i], _ = strconv.Atoi(goDo(t, p, "sleep:100ms")) })
	}
	wg.Wait()
	if pids[0] == pids[1] {
		t.Fatalf("both requests went to process %d", pids[0])
	}

	errs := make(chan error, 3)
	for range 3 { // two running, one queued
		go func() {
			_, err := p.Do(context.Background(), []byte("sleep:10s"))
			errs <- err
		}()
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Close took %v", took)
	}
	for range 3 {
		failure(t, <-errs, sandbox.Closed)
	}
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("process %d outlived Close", pid)
		}
	}
	_, err := p.Do(context.Background(), []byte("pid"))
	failure(t, err, sandbox.Closed)
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestUnavailable(t *testing.T) {
	tests := []struct {
		name string
		cfg  sandbox.Config
	}{
		{"serve not called for the name", sandbox.Config{Name: "sandbox-nobody"}},
		{"dies at start", sandbox.Config{Env: []string{"SANDBOX_TEST_DIE_AT_START=1"}}},
		{"never introduces itself", sandbox.Config{Env: []string{"SANDBOX_TEST_HANG_AT_START=1"}, Timeout: 300 * time.Millisecond}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, tc.cfg)
			_, err := p.Do(context.Background(), []byte("pid"))
			failure(t, err, sandbox.Unavailable)
			// Backing off: the next request fails at once, no process
			// started.
			start := time.Now()
			_, err = p.Do(context.Background(), []byte("pid"))
			f := failure(t, err, sandbox.Unavailable)
			if took := time.Since(start); took > 50*time.Millisecond || f.PID != 0 {
				t.Errorf("second failure took %v, pid %d; want it at once, without a process", took, f.PID)
			}
			if children() > 0 {
				t.Errorf("%d processes left behind", children())
			}
		})
	}
}

// A helper whose parent closes its requests, or dies, exits.
func TestHelperExitsOnEOF(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), "RLSPROXY_SANDBOX="+helperName)
	reqR, stdin, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, respW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.ExtraFiles = []*os.File{reqR, respW}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reqR.Close()
	respW.Close()
	var n uint32
	if err := binary.Read(stdout, binary.BigEndian, &n); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, stdout, int64(n)); err != nil {
		t.Fatal(err)
	}
	stdin.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("helper exited with %v, want status 0", err)
		}
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		t.Error("helper still running 5s after its stdin closed")
	}
}

// Logs carry sizes, kinds and the crash's first stderr line, never request
// bytes.
func TestLogs(t *testing.T) {
	var buf syncBuffer
	p := newPool(t, sandbox.Config{
		Workers:    1,
		Timeout:    300 * time.Millisecond,
		MaxRequest: 64,
		Logger:     slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	const marker = "s3cr3t-marker"
	for _, req := range []string{"segv " + marker, "sleep:10s " + marker, "big " + marker, strings.Repeat(marker, 10)} {
		if _, err := p.Do(context.Background(), []byte(req)); err == nil {
			t.Fatalf("%.20q succeeded", req)
		}
	}
	p.Close()
	logs := buf.String()
	for _, want := range []string{"process crashed", "SIGSEGV: segmentation violation", "request_bytes=18", "timed out", "malformed framing", "too large"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q", want)
		}
	}
	if strings.Contains(logs, marker) {
		t.Errorf("request bytes in the logs:\n%s", logs)
	}
	t.Log(logs)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// BenchmarkRoundTrip sends 100-byte echo requests through a warm pool. It
// also reports the idle helper's resident set. With a memory limit, each
// answer costs a read of the helper's /proc/<pid>/statm besides.
func BenchmarkRoundTrip(b *testing.B) {
	for _, limit := range []uint64{0, 256 << 20} {
		b.Run(fmt.Sprintf("MemoryLimit=%dMiB", limit>>20), func(b *testing.B) {
			benchmarkRoundTrip(b, limit)
		})
	}
}

func benchmarkRoundTrip(b *testing.B, limit uint64) {
	p := newPool(b, sandbox.Config{Workers: 1, MemoryLimit: limit, Logger: slog.New(slog.DiscardHandler)})
	var in info
	if err := json.Unmarshal([]byte(do(b, p, "info")), &in); err != nil {
		b.Fatal(err)
	}
	rss := procStatus(fmt.Sprintf("/proc/%d/status", in.PID), "VmRSS")
	req := []byte("echo:" + strings.Repeat("x", 95))
	ctx := context.Background()
	for b.Loop() {
		if _, err := p.Do(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	if rss > 0 {
		b.ReportMetric(float64(rss), "idle-helper-RSS-kB")
	}
}

// BenchmarkColdStart measures a request that has to start its process.
func BenchmarkColdStart(b *testing.B) {
	for b.Loop() {
		p := sandbox.New(sandbox.Config{Name: helperName})
		if _, err := p.Do(context.Background(), []byte("pid")); err != nil {
			b.Fatal(err)
		}
		p.Close()
	}
}
