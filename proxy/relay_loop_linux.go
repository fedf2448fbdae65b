//go:build linux

package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// relayLoops relays plaintext sessions on a few event loops, each a
// goroutine waiting on its own level-triggered epoll set. A session's
// sockets are taken off the Go runtime's poller for the length of the
// session: a loop reads a socket once per readiness and writes on at once,
// where a goroutine per direction pays a failed read, a park and a wake-up
// per message in the Go scheduler (README, "Design notes"; figures in
// BENCHMARKS.md). Sessions are spread over the loops in turn.
type relayLoops struct {
	loops []*relayLoop
	next  atomic.Uint32
}

// relayBuffer is the loops' read size, and so the largest frame handled
// whole; larger ones are streamed. Buffers of this size are held only by
// sessions with an incomplete frame or a backlog, so idle sessions hold none.
const relayBuffer = 64 << 10

// handOffOver is the largest Query, Parse or FunctionCall the guard reads on
// a loop: the longest it parses in process. A session sending a larger
// message is handed to goroutines of its own (relay_conn.go) for the rest of
// its life, so that the loop's other sessions never wait on a long parse.
const handOffOver = guard.MaxInProcessParse

func newRelayLoops(n int) (*relayLoops, error) {
	ls := &relayLoops{}
	for range n {
		l, err := newRelayLoop()
		if err != nil {
			ls.close()
			return nil, err
		}
		ls.loops = append(ls.loops, l)
		go l.run()
	}
	return ls, nil
}

// close stops the loops; sessions still on them are dropped.
func (ls *relayLoops) close() {
	if ls == nil {
		return
	}
	for _, l := range ls.loops {
		l.post(nil)
	}
}

// run relays a session on one of the loops and returns when it has ended.
// It returns false, having changed nothing, when a connection is not a
// plain socket (TLS) or cannot be taken off the runtime's poller.
func (ls *relayLoops) run(r *relay, client net.Conn, clientR *wire.Reader) bool {
	if ls == nil || !plainSocket(client) || !plainSocket(r.up.Conn()) {
		return false
	}
	cfd, err := takeFD(client)
	if err != nil {
		return false
	}
	sfd, err := takeFD(r.up.Conn())
	if err != nil {
		_ = unix.Close(cfd)
		return false
	}
	// From here the descriptors are the loop's; the net.Conns are closed.
	_ = client.Close()
	_ = r.up.Conn().Close()

	l := ls.loops[ls.next.Add(1)%uint32(len(ls.loops))]
	s := &loopSession{r: r, done: make(chan struct{})}
	s.client = loopSide{s: s, fd: cfd, client: true, peer: &s.server, in: bytes.Clone(clientR.Buffered())}
	s.server = loopSide{s: s, fd: sfd, peer: &s.client, in: bytes.Clone(r.up.Reader().Buffered())}
	r.clientBuf, r.serverBuf = relayBuffer, relayBuffer
	r.handOffOver = handOffOver
	r.setStop(func() { l.post(func() { l.finish(s) }) })
	if !l.post(func() { l.add(s) }) {
		r.end(endShutdown, nil)
		close(s.done)
	}
	<-s.done
	if s.handedOff {
		return ls.handOff(r, s, cfd, sfd, clientR)
	}

	// Back on the Go runtime: the client is told why the session ended and
	// closed; the upstream connection becomes a net.Conn for the pool.
	if r.fatal != nil || len(s.clientPend) > 0 {
		if c, err := fdConn(cfd); err == nil {
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			msg := s.clientPend
			if r.fatal != nil {
				msg = encodeError(msg, "FATAL", r.fatal)
			}
			_, _ = c.Write(msg)
			_ = c.Close()
		}
	} else {
		_ = unix.Close(cfd)
	}
	up, err := fdConn(sfd)
	if err != nil {
		// The pool sees a dead connection and drops it.
		r.serverBoundary = false
		up = closedConn{}
	}
	r.up.Rebind(up, nil)
	return true
}

// handOff carries on relaying a session the loop gave up (see handOffOver)
// with a goroutine per direction: what the loop had read and not yet
// written goes first.
func (ls *relayLoops) handOff(r *relay, s *loopSession, cfd, sfd int, clientR *wire.Reader) bool {
	r.handOffOver, r.handOff = 0, false
	client, err := fdConn(cfd)
	if err != nil {
		_ = unix.Close(sfd)
		r.end(endClientClosed, nil)
		r.up.Rebind(closedConn{}, nil)
		r.serverBoundary = false
		return true
	}
	up, err := fdConn(sfd)
	if err != nil {
		_ = client.Close()
		r.end(endServerClosed, upstreamLost(err))
		r.up.Rebind(closedConn{}, nil)
		r.serverBoundary = false
		return true
	}
	r.up.Rebind(up, s.serverIn)
	clientR.ResetBuffered(client, s.clientIn)
	r.runConns(client, clientR, s.clientPend, s.serverPend)
	return true
}

// relayLoop is one event loop.
type relayLoop struct {
	epfd, wakefd int

	mu    sync.Mutex
	queue []func() // run on the loop; nil stops it
	done  bool

	// Used by the loop goroutine only.
	sides   map[int32]*loopSide
	gen     int32 // tells a socket from an earlier one with the same number
	scratch []byte
	out     [][]byte
	iov     []unix.Iovec
	spare   [][]byte // buffers of relayBuffer capacity
}

// loopSession is a session on a loop: its two sides.
type loopSession struct {
	r              *relay
	client, server loopSide
	finished       bool
	// What the loop leaves when it finishes the session: bytes for either
	// side it could not write yet, and, when handedOff, bytes read from
	// either side and not yet relayed.
	clientPend, serverPend []byte
	clientIn, serverIn     []byte
	handedOff              bool
	done                   chan struct{}
}

// loopSide is one socket of a session.
type loopSide struct {
	s      *loopSession
	fd     int
	client bool // bytes read here go through fromClient
	peer   *loopSide
	in     []byte // read and not yet consumed: an incomplete frame (or frames held back)
	pend   []byte // to be written here once the socket takes more
	events uint32 // the epoll interest registered
	gen    int32
}

func newRelayLoop() (*relayLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("relay loop: epoll: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("relay loop: eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}); err != nil {
		_ = unix.Close(epfd)
		_ = unix.Close(wakefd)
		return nil, fmt.Errorf("relay loop: %w", err)
	}
	return &relayLoop{epfd: epfd, wakefd: wakefd, sides: map[int32]*loopSide{}, scratch: make([]byte, relayBuffer)}, nil
}

// post runs f on the loop (nil: stops it). It reports false if the loop has
// stopped.
func (l *relayLoop) post(f func()) bool {
	l.mu.Lock()
	if l.done {
		l.mu.Unlock()
		return false
	}
	if f == nil {
		l.done = true
	}
	l.queue = append(l.queue, f)
	// Written under the lock, which run holds to close the descriptor.
	one := [8]byte{1}
	_, _ = unix.Write(l.wakefd, one[:])
	l.mu.Unlock()
	return true
}

func (l *relayLoop) run() {
	defer func() {
		l.mu.Lock()
		_ = unix.Close(l.epfd)
		_ = unix.Close(l.wakefd)
		l.mu.Unlock()
	}()
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(l.epfd, events, -1)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			panic(fmt.Sprintf("relay loop: epoll_wait: %v", err))
		}
		for i := range events[:n] {
			ev := events[i]
			if int(ev.Fd) == l.wakefd {
				if !l.commands() {
					return
				}
				continue
			}
			x := l.sides[ev.Fd]
			if x == nil || x.gen != ev.Pad || x.s.finished {
				continue // finished earlier in this batch, or its number reused since
			}
			if ev.Events&unix.EPOLLOUT != 0 {
				l.flush(x)
			}
			switch {
			case x.s.over():
			case x.events&unix.EPOLLIN != 0 && ev.Events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) != 0:
				l.readable(x)
			case ev.Events&(unix.EPOLLHUP|unix.EPOLLERR) != 0:
				// Paused, and the socket is gone.
				x.s.r.lost(x.client, io.EOF)
			}
			l.settle(x.s)
		}
	}
}

// settle brings a session up to date after its sockets were served: the
// client side resumed once a re-injection is in, the sockets watched for
// what each side now waits on, the session finished if it is over.
func (l *relayLoop) settle(s *loopSession) {
	if s.r.released && !s.over() {
		s.r.released = false
		if len(s.client.in) > 0 {
			l.process(&s.client, s.client.in)
		}
	}
	if s.over() {
		l.finish(s)
		return
	}
	// A side is read while its peer has no backlog (and the client side
	// while the relay is not holding it back); it is written while it has
	// a backlog of its own.
	for _, x := range []*loopSide{&s.client, &s.server} {
		events := uint32(0)
		if len(x.peer.pend) == 0 && (!x.client || !s.r.paused()) {
			events |= unix.EPOLLIN
		}
		if len(x.pend) > 0 {
			events |= unix.EPOLLOUT
		}
		l.watch(x, events)
	}
}

// over reports a session the loop is done with: ended, or to be handed off.
func (s *loopSession) over() bool { return s.r.ended.Load() || s.r.handOff }

// commands runs what was posted; false means stop.
func (l *relayLoop) commands() bool {
	var b [8]byte
	_, _ = unix.Read(l.wakefd, b[:])
	l.mu.Lock()
	q := l.queue
	l.queue = nil
	l.mu.Unlock()
	for _, f := range q {
		if f == nil {
			for _, x := range l.sides {
				l.finish(x.s)
			}
			return false
		}
		f()
	}
	return true
}

// add registers a session and relays what was buffered during startup.
func (l *relayLoop) add(s *loopSession) {
	if s.finished {
		// The session ended before it was added (its stop, posted first,
		// finished it), and its goroutine owns and may have closed the
		// descriptors: registering their numbers now would register
		// whatever they name since, and nothing would remove it.
		return
	}
	for _, x := range []*loopSide{&s.client, &s.server} {
		l.gen++
		x.events, x.gen = unix.EPOLLIN, l.gen
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, x.fd, &unix.EpollEvent{Events: x.events, Fd: int32(x.fd), Pad: x.gen}); err != nil {
			s.r.end(endServerClosed, newClientError(codeConnectionFailure, "relay", "rlsproxy: relay: "+err.Error()))
			l.finish(s)
			return
		}
		l.sides[int32(x.fd)] = x
	}
	for _, x := range []*loopSide{&s.client, &s.server} {
		in := x.in // buffered during startup: relayed, not read into
		x.in = nil
		if len(in) > 0 && !s.over() {
			l.process(x, in)
		}
	}
	l.settle(s)
}

// readable reads once from x and relays what it can.
func (l *relayLoop) readable(x *loopSide) {
	buf, off := l.scratch, 0
	if x.in != nil {
		buf, off = x.in[:cap(x.in)], len(x.in)
	}
	if off == len(buf) {
		// Cannot happen: an incomplete frame kept here is smaller than the
		// buffer (a larger one is streamed).
		x.s.r.end(endProtocolError, newClientError(codeProtocolViolation, "protocol", "rlsproxy: relay buffer full"))
		return
	}
	n, err := rawRead(x.fd, buf[off:])
	if err == unix.EAGAIN || err == unix.EINTR {
		return
	}
	if err != nil || n == 0 {
		if err == nil {
			err = io.EOF
		}
		x.s.r.lost(x.client, err)
		return
	}
	l.process(x, buf[:off+n])
}

// process passes bytes read from x through the relay to x's peer and keeps
// an incomplete frame for the next read.
func (l *relayLoop) process(x *loopSide, in []byte) {
	r := x.s.r
	var used int
	if x.client {
		used, l.out = r.fromClient(in, l.out[:0])
	} else {
		used, l.out = r.fromServer(in, l.out[:0])
	}
	l.send(x.peer, l.out)
	clear(l.out)
	if own := r.takeInject(x.client); own != nil {
		l.send(x, [][]byte{own})
	}
	rest := in[used:]
	switch {
	case len(rest) == 0:
		l.release(x.in)
		x.in = nil
	case x.in == nil:
		x.in = append(l.buffer(), rest...)
	default:
		x.in = x.in[:copy(x.in[:cap(x.in)], rest)]
	}
}

// send writes segments to y, keeping what the socket does not take (settle
// then pauses y's peer until it has been written).
func (l *relayLoop) send(y *loopSide, segs [][]byte) {
	if len(segs) == 0 {
		return
	}
	if y.pend != nil {
		for _, b := range segs {
			y.pend = append(y.pend, b...)
		}
		return
	}
	w, err := l.writev(y.fd, segs)
	if err == unix.EAGAIN || err == unix.EINTR {
		w, err = 0, nil
	}
	if err != nil {
		y.s.r.lost(y.client, err)
		return
	}
	y.s.r.count(!y.client, w)
	for _, b := range segs {
		if w >= len(b) {
			w -= len(b)
			continue
		}
		if y.pend == nil {
			y.pend = l.buffer()
		}
		y.pend = append(y.pend, b[w:]...)
		w = 0
	}
}

// flush writes y's backlog.
func (l *relayLoop) flush(y *loopSide) {
	if len(y.pend) == 0 {
		return
	}
	w, err := rawWrite(y.fd, y.pend)
	if err == unix.EAGAIN || err == unix.EINTR {
		return
	}
	if err != nil {
		y.s.r.lost(y.client, err)
		return
	}
	y.s.r.count(!y.client, w)
	y.pend = y.pend[:copy(y.pend, y.pend[w:])]
	if len(y.pend) > 0 {
		return
	}
	l.release(y.pend)
	y.pend = nil
}

func (l *relayLoop) watch(x *loopSide, events uint32) {
	if events == x.events {
		return
	}
	x.events = events
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, x.fd, &unix.EpollEvent{Events: events, Fd: int32(x.fd), Pad: x.gen}); err != nil {
		x.s.r.end(endServerClosed, newClientError(codeConnectionFailure, "relay", "rlsproxy: relay: "+err.Error()))
	}
}

// finish takes a session off the loop and hands it back to its goroutine.
func (l *relayLoop) finish(s *loopSession) {
	if s.finished {
		return
	}
	s.finished = true
	for _, x := range []*loopSide{&s.client, &s.server} {
		if l.sides[int32(x.fd)] == x {
			delete(l.sides, int32(x.fd))
			_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, x.fd, nil)
		}
	}
	r := s.r
	r.clientMidFrame = r.clientPass > 0 || len(s.server.pend) > 0
	r.serverBoundary = len(s.server.in) == 0 && r.serverPass == 0 && r.serverDrop == 0
	s.clientPend = bytes.Clone(s.client.pend)
	s.handedOff = r.handOff && !r.ended.Load()
	if s.handedOff {
		s.serverPend = bytes.Clone(s.server.pend)
		s.clientIn, s.serverIn = bytes.Clone(s.client.in), bytes.Clone(s.server.in)
	}
	for _, x := range []*loopSide{&s.client, &s.server} {
		l.release(x.in)
		l.release(x.pend)
		x.in, x.pend = nil, nil
	}
	if !s.handedOff && !r.ended.Load() {
		r.end(endShutdown, newClientError(codeAdminShutdown, "shutdown", "terminating connection because rlsproxy is shutting down"))
	}
	close(s.done)
}

// buffer returns an empty buffer of relayBuffer capacity.
func (l *relayLoop) buffer() []byte {
	if n := len(l.spare); n > 0 {
		b := l.spare[n-1]
		l.spare = l.spare[:n-1]
		return b
	}
	return make([]byte, 0, relayBuffer)
}

func (l *relayLoop) release(b []byte) {
	if cap(b) == relayBuffer && len(l.spare) < 64 {
		l.spare = append(l.spare, b[:0])
	}
}

// writev writes segs in one system call.
func (l *relayLoop) writev(fd int, segs [][]byte) (int, error) {
	if len(segs) == 1 {
		return rawWrite(fd, segs[0])
	}
	l.iov = l.iov[:0]
	for _, b := range segs[:min(len(segs), 1024)] { // IOV_MAX
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		l.iov = append(l.iov, v)
	}
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&l.iov[0])), uintptr(len(l.iov)))
	clear(l.iov)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawRead and rawWrite are read(2) and write(2) without telling the Go
// scheduler: on a non-blocking socket they do not block, so the loop keeps
// its P instead of handing it off and taking it back around every call.
func rawRead(fd int, b []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func rawWrite(fd int, b []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// plainSocket reports a TCP or unix socket without TLS over it.
func plainSocket(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	}
	return false
}

// takeFD duplicates a connection's descriptor (close-on-exec and
// non-blocking, as the runtime keeps it), for the caller to close the
// connection and own the socket.
func takeFD(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return fd, derr
}

// fdConn makes a net.Conn of a socket descriptor, which it takes: the
// descriptor is closed, the conn holds a duplicate.
func fdConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "relay")
	defer f.Close()
	return net.FileConn(f)
}

// closedConn stands for an upstream connection that could not be taken
// back from the loop: every use fails, so the pool drops it.
type closedConn struct{ net.Conn }

func (closedConn) Read([]byte) (int, error)         { return 0, net.ErrClosed }
func (closedConn) Write([]byte) (int, error)        { return 0, net.ErrClosed }
func (closedConn) Close() error                     { return nil }
func (closedConn) SetDeadline(time.Time) error      { return nil }
func (closedConn) SetReadDeadline(time.Time) error  { return nil }
func (closedConn) SetWriteDeadline(time.Time) error { return nil }
