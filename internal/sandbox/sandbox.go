// Package sandbox runs a request/response function in helper processes, so
// work that can crash the process (a C stack overflow in a cgo library) or
// exhaust its memory takes down a disposable helper instead of the proxy.
//
// Helpers are re-executions of the running binary: a package registers its
// Handler with Serve from an init function, and a Pool started by the same
// binary sends requests to copies of itself that answered Serve. Requests and
// responses travel over two pipes of their own (descriptors 3 and 4 in the
// helper), each framed as a 4-byte big-endian length and that many bytes. The
// helper's stdout and stderr both go to a third pipe the pool drains: a
// library that prints (libpg_query writes to stdout when a FATAL error ends
// the process) cannot be taken for an answer.
//
// A helper is a containment boundary for crashes and memory, not a security
// boundary: it runs as the same user, with the same environment, as its parent.
package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Environment variables through which a Pool tells its helpers who they are.
const (
	envName    = "RLSPROXY_SANDBOX"
	envMemory  = "RLSPROXY_SANDBOX_MEMORY"
	envTimeout = "RLSPROXY_SANDBOX_TIMEOUT"
)

const (
	defaultWorkers     = 2
	defaultTimeout     = 30 * time.Second
	defaultMaxRequest  = 64 << 20
	defaultMaxResponse = 1 << 20

	// A failed start is not retried at once: a binary that cannot serve
	// (Serve not linked, a limit too low to boot) would otherwise be
	// re-executed for every request.
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second

	// helloPrefix opens a helper's first frame. A child that did not reach
	// Serve (wrong name, Serve not linked) never sends it, so it cannot be
	// mistaken for a helper whatever it writes to stdout.
	helloPrefix = "rlsproxy-sandbox/1 "

	// maxLogLine bounds the one stderr line logged for a crash.
	maxLogLine = 256

	// stderrGrace bounds how long a crash report waits for the dead helper's
	// last stderr bytes; only a grandchild holding the pipe open makes it
	// matter.
	stderrGrace = time.Second
)

// Handler answers one request inside a helper process. It must not write the
// request to stdout or stderr, since the pool logs one line of a crashed
// helper's output.
type Handler func(req []byte) (resp []byte)

// Serve makes this process a helper if it was started as one for name (the
// environment variable RLSPROXY_SANDBOX equals name): it applies the limits
// passed by the parent, answers the requests the parent sends until it
// closes their pipe, then exits the process. In any other process it returns at once.
// Packages call it from an init function (so every binary that links them,
// test binaries included, can serve as a helper), or tests from TestMain.
func Serve(name string, h Handler) {
	if name == "" || os.Getenv(envName) != name {
		return
	}
	os.Exit(serve(name, h, os.NewFile(3, "requests"), os.NewFile(4, "responses")))
}

func serve(name string, h Handler, in io.Reader, out io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "sandbox %s: %v\n", name, err)
		return 1
	}
	var memory uint64
	if s := os.Getenv(envMemory); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return fail(fmt.Errorf("%s: %w", envMemory, err))
		}
		memory = n
	}
	var timeout time.Duration
	if s := os.Getenv(envTimeout); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			return fail(fmt.Errorf("%s: %w", envTimeout, err))
		}
		timeout = d
	}
	// A helper that cannot enforce its memory limit must not serve: the
	// limit is what keeps one statement from exhausting the host.
	if err := applyLimits(memory); err != nil {
		return fail(err)
	}
	// Anything this process starts is not a helper.
	for _, k := range []string{envName, envMemory, envTimeout} {
		os.Unsetenv(k)
	}

	r := bufio.NewReaderSize(in, 64<<10)
	w := bufio.NewWriterSize(out, 64<<10)
	if err := writeFrame(w, []byte(helloPrefix+name)); err != nil {
		return 1
	}
	for {
		req, err := readFrame(r, math.MaxUint32)
		if err == io.EOF {
			// The parent closed the requests, or died: either way nobody is
			// left to answer.
			return 0
		}
		if err != nil {
			return fail(fmt.Errorf("reading a request: %w", err))
		}
		// The parent kills a request at timeout; this only matters if the
		// parent died meanwhile, when a runaway handler would otherwise
		// never read the EOF that ends the helper.
		var watchdog *time.Timer
		if timeout > 0 {
			watchdog = time.AfterFunc(2*timeout, func() {
				fmt.Fprintf(os.Stderr, "sandbox %s: request still running after %s, twice the pool's timeout\n", name, 2*timeout)
				os.Exit(3)
			})
		}
		resp := h(req)
		if watchdog != nil {
			watchdog.Stop()
		}
		if err := writeFrame(w, resp); err != nil {
			return 1
		}
	}
}

// Config describes a Pool. Zero values select the defaults.
//
// A Go heap never unmaps what it has mapped, so a request that grew a
// helper's heap leaves less of MemoryLimit to the next one. On Linux a helper
// whose data mappings grew by more than half the room it started with under
// MemoryLimit is therefore replaced after answering: whether a request fits
// should not depend much on what the helper answered before.
type Config struct {
	Name        string        // which Serve call answers in the child (required)
	Env         []string      // extra KEY=VALUE entries for the child's environment
	Workers     int           // most processes alive at once (default 2)
	MemoryLimit uint64        // RLIMIT_DATA of each process in bytes; 0: none
	Timeout     time.Duration // per request; the process is killed past it (default 30s)
	MaxRequest  int           // largest request in bytes (default 64 MiB); larger ones fail at once
	MaxResponse int           // largest response in bytes (default 1 MiB); a larger one counts as a crash
	Logger      *slog.Logger  // nil: discard
}

// Kind classifies a Failure.
type Kind int

// The kinds of Failure.
const (
	// Crashed: the process died, or broke the framing, while answering
	// this request. It is replaced on the next need.
	Crashed Kind = iota + 1
	// TimedOut: no answer within Config.Timeout; the process was killed.
	TimedOut
	// Busy: ctx ended before a process was free to take the request.
	Busy
	// Canceled: ctx ended while a process was answering; the process was
	// killed, since its answer can no longer be delivered.
	Canceled
	// TooLarge: the request exceeds Config.MaxRequest.
	TooLarge
	// Closed: the pool is closed, or was closed while the request ran.
	Closed
	// Unavailable: no process could be started, or one recently failed to.
	Unavailable
)

func (k Kind) String() string {
	switch k {
	case Crashed:
		return "crashed"
	case TimedOut:
		return "timed out"
	case Busy:
		return "busy"
	case Canceled:
		return "canceled"
	case TooLarge:
		return "too large"
	case Closed:
		return "closed"
	case Unavailable:
		return "unavailable"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// Failure is the error Pool.Do returns. Its message holds sizes, a process id
// and an exit status, never request or response bytes, so it can be logged or
// shown to a client as it is.
type Failure struct {
	Kind   Kind
	Pool   string // Config.Name
	Size   int    // request bytes
	PID    int    // the process involved; 0 if none was
	Status string // how that process ended, e.g. "exit status 2" or "signal: killed"
	Err    error  // the cause, if there is more to say than Kind
}

func (f *Failure) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sandbox %s: %s (", f.Pool, f.Kind)
	if f.Status != "" {
		b.WriteString(f.Status)
		b.WriteString(", ")
	}
	if f.PID != 0 {
		fmt.Fprintf(&b, "pid %d, ", f.PID)
	}
	fmt.Fprintf(&b, "request of %d bytes)", f.Size)
	if f.Err != nil {
		b.WriteString(": ")
		b.WriteString(f.Err.Error())
	}
	return b.String()
}

func (f *Failure) Unwrap() error { return f.Err }

// Pool runs requests in helper processes started from the running binary.
// Its methods are safe for concurrent use.
type Pool struct {
	cfg  Config
	env  []string
	argv []string
	log  *slog.Logger

	// active counts Do calls between their check of closed and their
	// return, so Close can wait for the processes they hold.
	active sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	free    int                // slots no request holds; a slot is the right to one process
	waiters []chan struct{}    // requests waiting for a slot, oldest first
	idle    []*proc            // warm processes, most recently used last
	procs   map[*proc]struct{} // every process not yet reaped
	// Consecutive failed starts, and the backoff they earned.
	failures int
	retryAt  time.Time
	startErr error
}

// New returns a pool for cfg. No process starts until a request needs one.
// It panics if cfg.Name is empty, since no helper could ever answer.
func New(cfg Config) *Pool {
	if cfg.Name == "" {
		panic("sandbox: Config.Name is required")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = defaultWorkers
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultTimeout
	}
	if cfg.MaxRequest <= 0 {
		cfg.MaxRequest = defaultMaxRequest
	}
	if cfg.MaxResponse <= 0 {
		cfg.MaxResponse = defaultMaxResponse
	}
	// The frame's length field is 32 bits wide.
	cfg.MaxRequest = int(min(uint64(cfg.MaxRequest), math.MaxUint32))
	cfg.MaxResponse = int(min(uint64(cfg.MaxResponse), math.MaxUint32))
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	env := append(os.Environ(),
		// A helper serves one request at a time; more Ps only add threads,
		// whose stacks count against the memory limit.
		"GOMAXPROCS=1",
	)
	if cfg.MemoryLimit > 0 {
		// The Go heap's mappings stay counted against RLIMIT_DATA after
		// the GC frees them, so garbage must not push the heap's high
		// water mark there: collect harder well before the limit.
		env = append(env, "GOMEMLIMIT="+strconv.FormatUint(cfg.MemoryLimit/2, 10))
	}
	env = append(env, cfg.Env...)
	// Last, so that neither the inherited environment nor cfg.Env can
	// change which helper answers or loosen its limits. exec.Cmd keeps the
	// last of duplicate keys.
	env = append(env,
		envName+"="+cfg.Name,
		envMemory+"="+strconv.FormatUint(cfg.MemoryLimit, 10),
		envTimeout+"="+cfg.Timeout.String(),
	)
	return &Pool{
		cfg: cfg,
		env: env,
		// The argument names the helper in ps, and hands a binary that
		// does not call Serve for this name an argument to reject (as
		// rlsproxy's main does) instead of a bare start of its main.
		argv:  []string{os.Args[0], "sandbox:" + cfg.Name},
		log:   log.With("sandbox", cfg.Name),
		free:  cfg.Workers,
		procs: map[*proc]struct{}{},
	}
}

// Do sends req to a helper process and returns its answer. It waits, in the
// order of arrival, for one of Config.Workers processes to be free. Every
// error it returns is a *Failure.
func (p *Pool) Do(ctx context.Context, req []byte) ([]byte, error) {
	if len(req) > p.cfg.MaxRequest {
		p.log.Debug("sandbox: request too large", "request_bytes", len(req), "max_request", p.cfg.MaxRequest)
		return nil, p.failure(TooLarge, len(req), nil, fmt.Errorf("the limit is %d bytes", p.cfg.MaxRequest))
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, p.failure(Closed, len(req), nil, nil)
	}
	p.active.Add(1)
	p.mu.Unlock()
	defer p.active.Done()

	if err := p.acquire(ctx, len(req)); err != nil {
		return nil, err
	}
	defer p.release()
	pr, err := p.take(ctx, len(req))
	if err != nil {
		return nil, err
	}
	return p.exchange(ctx, pr, req)
}

// Close kills every process, waits until they are gone and until the Do calls
// they were answering have returned. Do fails with Closed afterwards.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	for _, w := range p.waiters {
		close(w)
	}
	p.waiters = nil
	idle := p.idle
	p.idle = nil
	procs := make([]*proc, 0, len(p.procs))
	for pr := range p.procs {
		procs = append(procs, pr)
	}
	p.mu.Unlock()

	for _, pr := range procs {
		pr.kill(Closed)
	}
	// The Do calls holding the other processes drop them themselves.
	for _, pr := range idle {
		pr.drop()
	}
	p.active.Wait()
	for _, pr := range procs {
		<-pr.exited
	}
	return nil
}

func (p *Pool) failure(k Kind, size int, pr *proc, err error) *Failure {
	f := &Failure{Kind: k, Pool: p.cfg.Name, Size: size, Err: err}
	if pr != nil {
		f.PID = pr.pid
		select {
		case <-pr.exited:
			f.Status = pr.status
		default:
		}
	}
	return f
}

// acquire takes a slot, waiting behind earlier requests if none is free.
func (p *Pool) acquire(ctx context.Context, size int) error {
	// A request whose caller is gone must not take a process, least of
	// all one it would have to kill on its first step.
	if err := ctx.Err(); err != nil {
		return p.failure(Busy, size, nil, err)
	}
	p.mu.Lock()
	if p.free > 0 && len(p.waiters) == 0 {
		p.free--
		p.mu.Unlock()
		return nil
	}
	w := make(chan struct{})
	p.waiters = append(p.waiters, w)
	p.mu.Unlock()

	select {
	case <-w:
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return p.failure(Closed, size, nil, nil)
		}
		return nil
	case <-ctx.Done():
		p.mu.Lock()
		defer p.mu.Unlock()
		select {
		case <-w:
			// Handed a slot as ctx ended: pass it on.
			if !p.closed {
				p.releaseLocked()
			}
		default:
			for i, x := range p.waiters {
				if x == w {
					p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
					break
				}
			}
		}
		p.log.Debug("sandbox: no process free", "request_bytes", size)
		return p.failure(Busy, size, nil, context.Cause(ctx))
	}
}

func (p *Pool) release() {
	p.mu.Lock()
	if !p.closed {
		p.releaseLocked()
	}
	p.mu.Unlock()
}

func (p *Pool) releaseLocked() {
	if len(p.waiters) > 0 {
		w := p.waiters[0]
		p.waiters = p.waiters[1:]
		close(w)
		return
	}
	p.free++
}

// take returns a process for the slot the caller holds: a warm one, or a new
// one unless starts are backing off.
func (p *Pool) take(ctx context.Context, size int) (*proc, error) {
	p.mu.Lock()
	for len(p.idle) > 0 {
		pr := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		select {
		case <-pr.exited:
			// Died while idle (the OOM killer, an operator): not this
			// request's fault.
			pr.drop()
			continue
		default:
		}
		p.mu.Unlock()
		return pr, nil
	}
	if wait := time.Until(p.retryAt); wait > 0 {
		err := p.startErr
		p.mu.Unlock()
		return nil, p.failure(Unavailable, size, nil, fmt.Errorf("backing off for %s after a failed start: %w", wait.Round(time.Millisecond), err))
	}
	p.mu.Unlock()
	return p.start(ctx, size)
}

func (p *Pool) putBack(pr *proc) {
	p.mu.Lock()
	closed := p.closed
	if !closed {
		p.idle = append(p.idle, pr)
	}
	p.mu.Unlock()
	if closed {
		// Close killed it already.
		pr.drop()
	}
}

func (p *Pool) start(ctx context.Context, size int) (*proc, error) {
	began := time.Now()
	pr, err := p.spawn()
	if err != nil {
		return nil, p.startFailed(size, nil, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		pr.kill(Closed)
		p.reap(pr)
		pr.drop()
		return nil, p.failure(Closed, size, pr, nil)
	}
	p.procs[pr] = struct{}{}
	p.mu.Unlock()
	go p.reap(pr)

	var hello []byte
	fit, err := supervise(ctx, pr, p.cfg.Timeout, func() error {
		var err error
		hello, err = readFrame(pr.r, uint64(len(helloPrefix)+len(p.cfg.Name)))
		return err
	})
	if err != nil {
		err = fmt.Errorf("no introduction: %w", err)
	} else if string(hello) != helloPrefix+p.cfg.Name {
		err = errors.New("the process introduced itself as something else")
	}
	if err == nil && fit {
		p.mu.Lock()
		p.failures, p.retryAt, p.startErr = 0, time.Time{}, nil
		p.mu.Unlock()
		if p.cfg.MemoryLimit > 0 {
			if d := newDataProbe(pr.pid); d != nil {
				if pr.baseData, _ = d.bytes(); pr.baseData > 0 {
					pr.data = d
				} else {
					d.close()
				}
			}
		}
		p.log.Debug("sandbox: process started", "pid", pr.pid, "took", time.Since(began))
		return pr, nil
	}
	pr.kill(Crashed)
	pr.drop()
	why := pr.reason()
	switch {
	case why == Closed:
		return nil, p.failure(Closed, size, pr, nil)
	case why == Canceled || ctx.Err() != nil:
		// The caller gave up; nothing is known against the binary.
		return nil, p.failure(Busy, size, pr, context.Cause(ctx))
	case why == TimedOut || err == nil:
		// err is nil if the introduction arrived as the timer fired.
		err = fmt.Errorf("no introduction within %s", p.cfg.Timeout)
	}
	return nil, p.startFailed(size, pr, err)
}

// startFailed backs off further starts, so a binary that cannot serve fails
// requests at once instead of being re-executed for each.
func (p *Pool) startFailed(size int, pr *proc, err error) error {
	p.mu.Lock()
	p.failures++
	backoff := maxBackoff
	if p.failures <= 6 {
		backoff = min(minBackoff<<(p.failures-1), maxBackoff)
	}
	p.retryAt = time.Now().Add(backoff)
	p.startErr = err
	p.mu.Unlock()
	f := p.failure(Unavailable, size, pr, err)
	attrs := []any{"err", err, "retry_in", backoff}
	if pr != nil {
		attrs = append(attrs, "pid", pr.pid, "status", f.Status, "stderr", pr.stderr.line(stderrGrace))
	}
	p.log.Warn("sandbox: process failed to start", attrs...)
	return f
}

func (p *Pool) spawn() (*proc, error) {
	exe, err := executable()
	if err != nil {
		return nil, err
	}
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err == nil {
			files = append(files, r, w)
		}
		return r, w, err
	}
	inR, inW, err := pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := pipe()
	if err != nil {
		closeAll()
		return nil, err
	}
	errR, errW, err := pipe()
	if err != nil {
		closeAll()
		return nil, err
	}
	// *os.File ends go to the child as they are: no copying goroutines,
	// and Wait does not close the parent's ends under a pending read.
	cmd := &exec.Cmd{
		Path:        exe,
		Args:        p.argv,
		Env:         p.env,
		Stdout:      errW,
		Stderr:      errW,
		ExtraFiles:  []*os.File{inR, outW}, // descriptors 3 and 4
		SysProcAttr: sysProcAttr(),
	}
	if err := cmd.Start(); err != nil {
		closeAll()
		return nil, err
	}
	// The parent must not hold the child's ends: the child's EOF on its
	// requests is how it learns that the parent is gone.
	inR.Close()
	outW.Close()
	errW.Close()
	pr := &proc{
		cmd:    cmd,
		pid:    cmd.Process.Pid,
		in:     inW,
		w:      bufio.NewWriterSize(inW, 64<<10),
		out:    outR,
		r:      bufio.NewReaderSize(outR, 64<<10),
		exited: make(chan struct{}),
		stderr: &stderrLine{drained: make(chan struct{})},
	}
	go func() {
		io.Copy(pr.stderr, errR)
		errR.Close()
		close(pr.stderr.drained)
	}()
	return pr, nil
}

// reap waits for pr to exit and forgets it. The pipes stay open: whoever
// holds pr may be reading them, and would see "file already closed" instead of
// the EOF that tells what happened.
func (p *Pool) reap(pr *proc) {
	pr.cmd.Wait()
	pr.status = pr.cmd.ProcessState.String()
	close(pr.exited)

	p.mu.Lock()
	delete(p.procs, pr)
	wasIdle := false
	for i, x := range p.idle {
		if x == pr {
			p.idle = append(p.idle[:i], p.idle[i+1:]...)
			wasIdle = true
			break
		}
	}
	p.mu.Unlock()
	if wasIdle {
		pr.drop()
		p.log.Warn("sandbox: idle process exited", "pid", pr.pid, "status", pr.status, "stderr", pr.stderr.line(stderrGrace))
	}
}

func (p *Pool) exchange(ctx context.Context, pr *proc, req []byte) ([]byte, error) {
	pr.stderr.reset()
	var resp []byte
	fit, err := supervise(ctx, pr, p.cfg.Timeout, func() error {
		if err := writeFrame(pr.w, req); err != nil {
			return err
		}
		var err error
		resp, err = readFrame(pr.r, uint64(p.cfg.MaxResponse))
		return err
	})
	if err == nil && fit {
		if p.spent(pr) {
			pr.kill(0)
			pr.drop()
			return resp, nil
		}
		p.putBack(pr)
		return resp, nil
	}
	// Past this point the process is done for: it failed, or a kill for
	// the timer or ctx may be on its way.
	pr.kill(Crashed)
	pr.drop()
	if err == nil {
		// The answer made it just as the timer or ctx fired.
		return resp, nil
	}
	switch why := pr.reason(); why {
	case TimedOut:
		p.log.Warn("sandbox: request timed out, process killed", "pid", pr.pid, "request_bytes", len(req), "timeout", p.cfg.Timeout)
		return nil, p.failure(TimedOut, len(req), pr, fmt.Errorf("no answer within %s", p.cfg.Timeout))
	case Canceled:
		p.log.Debug("sandbox: request canceled, process killed", "pid", pr.pid, "request_bytes", len(req))
		return nil, p.failure(Canceled, len(req), pr, context.Cause(ctx))
	case Closed:
		return nil, p.failure(Closed, len(req), pr, nil)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		err = fmt.Errorf("no answer: %w", err)
	}
	f := p.failure(Crashed, len(req), pr, err)
	p.log.Warn("sandbox: process crashed", "pid", pr.pid, "status", f.Status, "request_bytes", len(req), "err", err, "stderr", pr.stderr.line(stderrGrace))
	return nil, f
}

// spent reports whether pr has used up too much of its memory budget to be
// given another request (see Config).
func (p *Pool) spent(pr *proc) bool {
	if pr.data == nil {
		return false
	}
	d, ok := pr.data.bytes()
	room := p.cfg.MemoryLimit - min(pr.baseData, p.cfg.MemoryLimit)
	if !ok || d-min(d, pr.baseData) <= room/2 {
		return false
	}
	p.log.Debug("sandbox: process retired, half its memory headroom spent", "pid", pr.pid, "data_bytes", d, "data_bytes_at_start", pr.baseData)
	return true
}

// supervise runs fn, the pool's side of one exchange with pr, while a timer
// and ctx may kill pr. fit reports that neither did nor will, so pr can be
// reused. A kill is what unblocks fn: the dead child's ends of the pipes close,
// and fn's read or write fails.
func supervise(ctx context.Context, pr *proc, timeout time.Duration, fn func() error) (fit bool, err error) {
	timer := time.AfterFunc(timeout, func() { pr.kill(TimedOut) })
	stop := context.AfterFunc(ctx, func() { pr.kill(Canceled) })
	err = fn()
	timerStopped := timer.Stop()
	ctxStopped := stop()
	return timerStopped && ctxStopped, err
}

// proc is one helper process.
type proc struct {
	cmd    *exec.Cmd
	pid    int
	in     *os.File
	w      *bufio.Writer
	out    *os.File
	r      *bufio.Reader
	stderr *stderrLine
	exited chan struct{} // closed once the process is reaped
	status string        // how it ended; set before exited is closed
	// With a memory limit, where measurable: the process's data mappings
	// now and once it was ready to serve; see Config.
	data     *dataProbe
	baseData uint64

	mu  sync.Mutex
	why Kind // why the pool killed it, first reason wins; 0 if it did not
}

func (pr *proc) kill(why Kind) {
	pr.mu.Lock()
	if pr.why == 0 {
		pr.why = why
	}
	pr.mu.Unlock()
	// Process.Kill uses a pidfd where the kernel has one, so a reaped pid
	// reused by another process is never signalled.
	pr.cmd.Process.Kill()
}

// drop waits for the killed process to be reaped and closes the pool's ends of
// its pipes. Only the holder of pr calls it: a Do call, or the pool for an
// idle process.
func (pr *proc) drop() {
	<-pr.exited
	pr.in.Close()
	pr.out.Close()
	pr.data.close()
}

func (pr *proc) reason() Kind {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.why
}

// stderrLine drains a helper's stderr, which must be read lest the helper
// block on a full pipe, and keeps the one line of it the pool may log: the
// first non-blank line since reset. A Go crash report opens with its cause
// ("fatal error: runtime: out of memory", "SIGSEGV: segmentation violation")
// and ends in stack frames and register dumps, so the first line of a
// request's output says what went wrong where the last would not.
type stderrLine struct {
	mu      sync.Mutex
	buf     []byte
	done    bool          // buf holds a complete line
	drained chan struct{} // closed at EOF
}

func (s *stderrLine) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(b)
	for len(b) > 0 && !s.done {
		part, rest, eol := bytes.Cut(b, []byte{'\n'})
		if room := maxLogLine - len(s.buf); len(part) > room {
			part = part[:room]
		}
		s.buf = append(s.buf, part...)
		if !eol {
			break
		}
		b = rest
		if len(bytes.TrimSpace(s.buf)) > 0 {
			s.done = true
		} else {
			s.buf = s.buf[:0]
		}
	}
	return n, nil
}

func (s *stderrLine) reset() {
	s.mu.Lock()
	s.buf, s.done = s.buf[:0], false
	s.mu.Unlock()
}

// line returns the kept line, waiting up to grace for the rest of a dead
// helper's output.
func (s *stderrLine) line(grace time.Duration) string {
	t := time.NewTimer(grace)
	select {
	case <-s.drained:
	case <-t.C:
	}
	t.Stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.ToValidUTF8(string(bytes.TrimSpace(s.buf)), "\uFFFD")
}

func writeFrame(w *bufio.Writer, b []byte) error {
	if uint64(len(b)) > math.MaxUint32 {
		return fmt.Errorf("a frame of %d bytes does not fit the 32-bit length", len(b))
	}
	var h [4]byte
	binary.BigEndian.PutUint32(h[:], uint32(len(b)))
	w.Write(h[:])
	w.Write(b)
	return w.Flush()
}

// readFrame reads one frame of at most limit bytes. It returns io.EOF only if
// the stream ended cleanly between frames.
func readFrame(r *bufio.Reader, limit uint64) ([]byte, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(h[:])
	if uint64(n) > limit {
		return nil, fmt.Errorf("malformed framing: a frame of %d bytes exceeds the limit of %d", n, limit)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}
