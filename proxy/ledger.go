package proxy

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/session"
)

// ledger owns what the server owes one upstream connection: an entry for
// every message sent to it that it will answer or may consume, in the order
// sent, each settled by the server's own answers. It never infers the
// server's state from what a client claims: whether the server is in COPY
// comes from CopyInResponse and CopyOutResponse, whether messages are
// skipped after an error from the ErrorResponse and the protocol rules of
// postgres.c, and an answer that fits no entry is an error, after which the
// connection is closed, never reused.
//
// The rules it follows (PostgreSQL 15, postgres.c and copyfromparse.c):
//   - Parse, Bind, Describe, Execute and Close are each answered by one
//     completion (ParseComplete, BindComplete, RowDescription or NoData after
//     an optional ParameterDescription, CommandComplete, EmptyQueryResponse or
//     PortalSuspended after DataRows, CloseComplete) or by an ErrorResponse,
//     after which the server discards every message up to the next Sync,
//     Query and FunctionCall included.
//   - Sync, Query and FunctionCall are answered, in the end, by ReadyForQuery;
//     Flush by nothing.
//   - CopyData, CopyDone and CopyFail outside COPY FROM STDIN are ignored. In
//     it, the server consumes CopyData, ignores Sync and Flush, ends the copy
//     at CopyDone (or fails it at CopyFail), and fails on any other message
//     (08P01), which it has begun to read: it then ends the connection
//     (FATAL, "protocol synchronization was lost").
//
// One sequence cannot be followed: a Sync sent after CopyData while the copy
// may still be open, when the copy then fails: whether the server read that
// Sync before the failure (and ignored it) or after (and answers it) is not
// in its answers. No driver sends it; the ledger reports an error.
//
// The ledger is used by both directions of a relay, so it locks.
type ledger struct {
	mu     sync.Mutex
	q      []entry // owed, oldest first; q[:head] are settled
	head   int
	skip   bool // the server discards messages until the next Sync
	cp     copyState
	status byte // of the last ReadyForQuery
	// midBatch: the last message the server answered was an
	// extended-protocol one, not a ReadyForQuery. The server is then inside
	// the transaction that message began (or an explicit one an Execute of
	// BEGIN opened), whatever the last ReadyForQuery said, until a Sync
	// ends it: the connection is neither let go nor reused.
	midBatch bool
	err      error // the answers stopped fitting: the connection is not reusable
	maxSize  int
	// undone are the records of statements (transaction pooling's server
	// names; "" the unnamed one) made as a Parse, Close or DEALLOCATE was
	// sent, which the server failed or discarded unread: to be taken by
	// the relay (takeUndone) and put back as they were.
	undone []stmtRecord
}

// stmtRecord is whether the connection holds a statement, or, with all,
// that it holds none (a DEALLOCATE ALL); undone, all says that what it
// holds is no longer known.
type stmtRecord struct {
	name string
	held bool
	all  bool
	// kept: the connection's record of name changed (else only the
	// client's did).
	kept bool
	// client and stmt: the client's statement name a Close or DEALLOCATE
	// forgot, given back if the server does not run it.
	client string
	stmt   *statement
}

// entry is a run of messages of one type sent upstream, or one batch of the
// proxy's own.
type entry struct {
	typ byte // client message type, or ownEntry
	n   int  // messages in the run
	// refused holds the error to tell the client instead of the server's:
	// the message was a substitute for one the guard refused (n is 1).
	refused *clientError
	own     *session.Batch
	// reset marks a client's Query that resets role or settings: the relay
	// re-establishes the session once it is answered (n is 1).
	reset bool
	// trigger: the first message of the run was sent while a COPY FROM
	// STDIN was open, so the server consumed it as the cause of an error,
	// unless the copy failed for another reason before reading it.
	trigger bool
	// described: a Describe's ParameterDescription has come.
	described bool
	// silent: the proxy sent it on the client's behalf (a statement
	// prepared again on another connection): its completion is not passed
	// on, an error is (n is 1).
	silent bool
	// quiet: a Query the proxy sent on the client's behalf whose answers,
	// errors too, are not passed on (n is 1).
	quiet bool
	// records: a Parse, Close or DEALLOCATE (or DISCARD ALL) Query after
	// which the connection is recorded as holding statements or not (n is
	// 1); if the server fails or skips it, the records are undone
	// (ledger.undone).
	records []stmtRecord
}

const ownEntry = '*'

// copyState is the server's COPY state for the oldest entry, as the
// server's own CopyInResponse and CopyOutResponse tell it.
type copyState struct {
	in, out bool
	// What the server has read of the client's messages in COPY FROM STDIN,
	// as far as the ledger can tell.
	ended         bool // a CopyDone, CopyFail or other message ended it
	data          bool // CopyData was read
	syncAfterData bool // and a Sync after it
}

// maxLedger bounds the entries a session may have outstanding; the relay
// stops reading the client while it is full. Every entry is answered (or
// settled) without more input from the client, and the server's 8 KiB
// output buffer is flushed long before this many small answers wait in it,
// so waiting for the server to drain the ledger cannot deadlock.
const maxLedger = 1 << 14

func newLedger() *ledger { return &ledger{status: 'I', maxSize: maxLedger} }

// errUnfollowable is the one sequence whose answers cannot be counted.
var errUnfollowable = errors.New("a Sync was sent after CopyData while COPY FROM STDIN was open, and the copy failed: whether the server answers that Sync cannot be known")

// route says what the relay does with a server message.
type route uint8

const (
	toClient route = iota // pass it on
	drop                  // an answer to the proxy's own batch
	replace               // send the refusal the ledger returns instead
)

// event is what else the relay must act on after a server message.
type event uint8

const (
	noEvent      event = iota
	resetDone          // a client's reset Query has been answered
	resetSkipped       // a client's reset Query was discarded by the server: it never ran
	ownDone            // a batch of the proxy's own has been answered, and proved
)

// full reports whether the relay must stop sending client messages until
// the server has answered some.
func (l *ledger) full() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.q)-l.head >= l.maxSize
}

// idle reports whether the server owes nothing: every message sent has been
// answered and it waits for a new one in its normal state.
func (l *ledger) idle() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.head == len(l.q) && !l.skip && !l.cp.in && !l.cp.out
}

// queued reports whether the server has been sent more than the statement
// it runs now: a second Execute, Query or FunctionCall still owed, each of
// which may run anything, COMMIT included (an Execute of COMMIT commits
// without a Sync). Parse, Bind, Describe and Close run nothing of the
// client's; a Sync commits what ran before it.
func (l *ledger) queued() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.q[l.head:] {
		switch e.typ {
		case 'E', 'Q', 'F':
			if n += e.n; n > 1 {
				return true
			}
		}
	}
	return false
}

// quiet reports whether the server will send nothing more until the client
// sends more: every Sync, Query and FunctionCall sent has been answered
// (what is left of an extended-query batch waits for its Sync), or a COPY
// FROM STDIN waits for data. A session whose token expired ends then.
func (l *ledger) quiet() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cp.out {
		return false
	}
	if l.cp.in {
		return !l.cp.ended
	}
	for _, e := range l.q[l.head:] {
		switch e.typ {
		case 'S', 'Q', 'F', ownEntry:
			return false
		}
	}
	return true
}

// reusable reports whether the connection may serve another session as far
// as the answers go: idle, not in a transaction, and never out of step.
func (l *ledger) reusable() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err == nil && l.head == len(l.q) && !l.skip && !l.cp.in && !l.cp.out && !l.midBatch
}

// atRest reports whether the server is idle outside any transaction, as
// its own answers say: everything answered, the last answer a
// ReadyForQuery with status 'I'.
func (l *ledger) atRest() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.head == len(l.q) && !l.skip && !l.cp.in && !l.cp.out && !l.midBatch && l.status == 'I'
}

// txStatus returns the status of the last ReadyForQuery.
func (l *ledger) txStatus() byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.status
}

// sent records a client message of type typ sent upstream (never Terminate).
func (l *ledger) sent(typ byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.add(entry{typ: typ, n: 1})
}

// sentRefused records the substitute (a Query or Parse that fails in the
// server) sent for a client message the guard refused: the server's error
// for it is replaced by e.
func (l *ledger) sentRefused(typ byte, e *clientError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.add(entry{typ: typ, n: 1, refused: e})
}

// sentSilent records a Parse or Close the proxy sent on the client's
// behalf: its completion is dropped, an error passed on.
func (l *ledger) sentSilent(typ byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.add(entry{typ: typ, n: 1, silent: true})
}

// sentQuiet records a Query the proxy sent on the client's behalf whose
// answers, errors too, the client must not see.
func (l *ledger) sentQuiet() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.add(entry{typ: 'Q', n: 1, quiet: true})
}

// sentParse records a Parse of statement stmt that the connection is
// recorded as holding: silent for one the proxy sent on the client's
// behalf. Should the server fail or discard it, takeUndone reports it as
// not held.
func (l *ledger) sentParse(stmt string, silent bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.addRecorded(entry{typ: 'P', n: 1, silent: silent, records: []stmtRecord{{name: stmt, held: true, kept: true}}})
}

// sentForgetting records a client's message of type typ after which the
// connection is recorded as no longer holding some statements (recs, nil
// for none: then it is sent): a Close, a DEALLOCATE Query. Should
// the server fail or discard it, takeUndone reports them as held (the
// statements stay there, counted, and are closed with their session's
// other statements), or, for a DEALLOCATE ALL, the connection's statements
// as unknown.
func (l *ledger) sentForgetting(typ byte, recs []stmtRecord) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.addRecorded(entry{typ: typ, n: 1, records: recs})
}

// addRecorded adds e, undoing its records at once if the server will
// discard it unread; it reports whether e was queued.
func (l *ledger) addRecorded(e entry) bool {
	if !l.add(e) {
		l.undo(&e)
		return false
	}
	return true
}

// undo notes that the server failed or did not read e.
func (l *ledger) undo(e *entry) {
	for _, r := range e.records {
		r.held = !r.held
		l.undone = append(l.undone, r)
	}
}

// takeUndone returns the statement records to put back, the messages that
// made them having been failed or discarded by the server, since the last
// call.
func (l *ledger) takeUndone() []stmtRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.undone
	l.undone = nil
	return u
}

// sentReset records a client's Query that resets role or settings. It
// reports false when the server will discard it unread (it skips to Sync).
func (l *ledger) sentReset(recs []stmtRecord) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.addRecorded(entry{typ: 'Q', n: 1, reset: true, records: recs})
}

// sentOwn records one of the proxy's own batches sent upstream: its answers
// are checked by b and never reach the client.
func (l *ledger) sentOwn(b *session.Batch) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.add(entry{typ: ownEntry, n: 1, own: b})
}

// add appends e as the server will read it: ignored while the server skips
// to Sync, read as COPY data while a copy is open, queued otherwise. It
// reports whether e was queued.
func (l *ledger) add(e entry) bool {
	if l.skip {
		if e.typ != 'S' {
			return false // discarded by the server
		}
		l.skip = false
	}
	if l.cp.in && !l.cp.ended && l.head < len(l.q) && l.consumedByCopy(&e) {
		return false
	}
	if e.typ == 'H' {
		return false // Flush is never answered and changes nothing
	}
	if n := len(l.q); n > l.head && mergeable(&l.q[n-1], &e) {
		l.q[n-1].n++
	} else {
		l.q = append(l.q, e)
	}
	l.settle()
	return true
}

func mergeable(last, e *entry) bool {
	plain := func(x *entry) bool {
		return x.refused == nil && !x.reset && !x.trigger && !x.silent && !x.quiet && x.records == nil
	}
	return last.typ == e.typ && e.typ != ownEntry && plain(last) && plain(e) && !last.described
}

// consumedByCopy applies a message the server reads while its COPY FROM
// STDIN is open: it reports whether the copy consumes it. A message that
// ends the copy by causing an error is queued, marked: whether it was
// consumed is told by the copy's error.
func (l *ledger) consumedByCopy(e *entry) bool {
	switch e.typ {
	case 'd':
		l.cp.data = true
		return true
	case 'S', 'H':
		if l.cp.data && e.typ == 'S' {
			l.cp.syncAfterData = true
		}
		return true
	case 'c', 'f':
		l.cp.ended = true
		return true
	}
	l.cp.ended = true
	e.trigger = true
	return false
}

// settle drops messages at the head that the server ignores (COPY messages
// outside COPY) and compacts the queue.
func (l *ledger) settle() {
	for l.head < len(l.q) && !l.cp.in {
		switch l.q[l.head].typ {
		case 'd', 'c', 'f':
			l.head++
			continue
		}
		break
	}
	if l.head == len(l.q) {
		l.q, l.head = l.q[:0], 0
	} else if l.head > 64 && l.head > len(l.q)/2 {
		l.q, l.head = append(l.q[:0], l.q[l.head:]...), 0
	}
}

// pop settles one message of the oldest entry.
func (l *ledger) pop() {
	e := &l.q[l.head]
	switch e.typ {
	case 'S', 'Q', 'F', ownEntry: // answered by a ReadyForQuery
		l.midBatch = false
	default:
		// The proxy's own Close and Parse go ahead of the client's
		// messages, which say where the batch ends.
		l.midBatch = l.midBatch || !e.silent
	}
	e.n--
	e.described = false
	if e.n == 0 {
		l.head++
	}
	l.settle()
}

// received takes a message from the server (whole, or its first part when
// whole is false) and says where it goes. A non-nil error means the answers
// no longer fit what was sent: the session must end and the connection
// must be closed.
func (l *ledger) received(typ byte, body []byte, whole bool) (route, *clientError, event, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return drop, nil, noEvent, l.err
	}
	quiet := l.head < len(l.q) && l.q[l.head].quiet && !session.Async(typ)
	r, ce, ev, err := l.answer(typ, body, whole)
	if err != nil {
		l.err = err
	}
	if quiet {
		r, ce = drop, nil
	}
	return r, ce, ev, err
}

func (l *ledger) answer(typ byte, body []byte, whole bool) (route, *clientError, event, error) {
	var e *entry
	if l.head < len(l.q) {
		e = &l.q[l.head]
	}
	if e != nil && e.typ == ownEntry {
		if session.Async(typ) {
			if typ == 'N' {
				return drop, nil, noEvent, nil // notices of the proxy's own statements
			}
			return toClient, nil, noEvent, nil
		}
		if !whole {
			return drop, nil, noEvent, fmt.Errorf("a %d-byte answer to the proxy's own statements", len(body))
		}
		done, err := e.own.Answer(typ, body)
		if err != nil {
			return drop, nil, noEvent, err
		}
		if !done {
			return drop, nil, noEvent, nil
		}
		l.pop()
		l.status = body[0]
		return drop, nil, ownDone, nil
	}
	switch typ {
	case 'N', 'S', 'A':
		return toClient, nil, noEvent, nil
	case 'E':
		return l.failed(e, body, whole)
	}
	if e == nil {
		return drop, nil, noEvent, fmt.Errorf("unexpected message %q from the server: nothing was owed", typ)
	}
	if l.cp.out {
		switch typ {
		case 'd', 'c':
			return toClient, nil, noEvent, nil
		case 'C':
			l.cp = copyState{}
			if e.typ == 'E' {
				l.pop()
			}
			return toClient, nil, noEvent, nil
		}
		return drop, nil, noEvent, fmt.Errorf("message %q from the server during COPY TO STDOUT", typ)
	}
	if l.cp.in {
		if typ != 'C' {
			return drop, nil, noEvent, fmt.Errorf("message %q from the server during COPY FROM STDIN", typ)
		}
		l.cp = copyState{}
		if e.typ == 'E' {
			l.pop()
		}
		return toClient, nil, noEvent, nil
	}
	switch e.typ {
	case 'P':
		return l.completes(typ == '1', typ)
	case 'B':
		return l.completes(typ == '2', typ)
	case 'C':
		return l.completes(typ == '3', typ)
	case 'D':
		if typ == 't' && !e.described {
			e.described = true
			return toClient, nil, noEvent, nil
		}
		return l.completes(typ == 'T' || typ == 'n', typ)
	case 'E':
		switch typ {
		case 'D':
			return toClient, nil, noEvent, nil
		case 'G', 'H':
			return l.copyStarts(typ)
		}
		return l.completes(typ == 'C' || typ == 'I' || typ == 's', typ)
	case 'Q':
		switch typ {
		case 'T', 'D', 'C', 'I':
			return toClient, nil, noEvent, nil
		case 'G', 'H':
			return l.copyStarts(typ)
		case 'Z':
			return l.ready(e, body)
		}
	case 'F':
		switch typ {
		case 'V':
			return toClient, nil, noEvent, nil
		case 'Z':
			return l.ready(e, body)
		}
	case 'S':
		if typ == 'Z' {
			return l.ready(e, body)
		}
	}
	return drop, nil, noEvent, fmt.Errorf("message %q from the server does not answer %q", typ, e.typ)
}

// completes settles the oldest message when typ is its completion.
func (l *ledger) completes(ok bool, typ byte) (route, *clientError, event, error) {
	if !ok {
		return drop, nil, noEvent, fmt.Errorf("message %q from the server does not answer %q", typ, l.q[l.head].typ)
	}
	silent := l.q[l.head].silent
	l.pop()
	if silent {
		return drop, nil, noEvent, nil
	}
	return toClient, nil, noEvent, nil
}

// ready settles the oldest message, a Sync, Query or FunctionCall, with its
// ReadyForQuery.
func (l *ledger) ready(e *entry, body []byte) (route, *clientError, event, error) {
	if len(body) != 1 {
		return drop, nil, noEvent, errors.New("malformed ReadyForQuery from the server")
	}
	ev := noEvent
	if e.reset {
		ev = resetDone
	}
	l.status = body[0]
	l.pop()
	return toClient, nil, ev, nil
}

// copyStarts enters the COPY the oldest message (an Execute or a Query)
// began, and applies the client's messages sent since to it.
func (l *ledger) copyStarts(typ byte) (route, *clientError, event, error) {
	if typ == 'H' {
		l.cp = copyState{out: true}
		return toClient, nil, noEvent, nil
	}
	l.cp = copyState{in: true}
	if e := &l.q[l.head]; e.n > 1 {
		// The rest of the run comes after the COPY in the stream: the
		// server reads it during the copy.
		rest := *e
		rest.n, e.n = e.n-1, 1
		l.q = slices.Insert(l.q, l.head+1, rest)
	}
	// The messages queued behind the COPY are what the server reads next.
	keep := l.q[:l.head+1]
	rest := l.q[l.head+1:]
	for i := 0; i < len(rest); i++ {
		e := rest[i]
		if l.cp.ended {
			keep = append(keep, e)
			continue
		}
		if e.typ == ownEntry {
			return drop, nil, noEvent, errors.New("the proxy's own statements were sent during COPY FROM STDIN")
		}
		// A run is read one message at a time: the first message of a run
		// of non-copy messages ends the copy, the rest follow it.
		if l.consumedByCopy(&e) {
			continue
		}
		keep = append(keep, e)
	}
	l.q = keep
	return toClient, nil, noEvent, nil
}

// failed handles an ErrorResponse.
func (l *ledger) failed(e *entry, body []byte, whole bool) (route, *clientError, event, error) {
	ev := noEvent
	var code string
	var fatal bool
	if whole {
		var er pgproto3.ErrorResponse
		if er.Decode(body) == nil {
			code, fatal = er.Code, er.Severity == "FATAL" || er.Severity == "PANIC"
		}
	}
	if fatal {
		// The server ends the connection (shutdown, timeouts, a protocol
		// violation): the client reads why, then the relay sees it close.
		l.err = errors.New("the server ended the connection")
		return toClient, nil, noEvent, nil
	}
	if e == nil {
		return drop, nil, noEvent, errors.New("an error from the server when nothing was owed")
	}
	if l.cp.in {
		// The copy failed. Which of the client's messages the server had
		// read by then follows from the cause.
		if l.cp.syncAfterData {
			return drop, nil, noEvent, errUnfollowable
		}
		for i := l.head + 1; i < len(l.q); i++ {
			if t := &l.q[i]; t.trigger {
				t.trigger = false
				if code == "08P01" { // "unexpected message type ... during COPY from stdin": consumed
					if t.reset {
						ev = resetSkipped
					}
					l.undo(t)
					if t.n--; t.n == 0 {
						l.q = append(l.q[:i], l.q[i+1:]...)
					}
				}
				break
			}
		}
		l.cp = copyState{}
	}
	l.cp.out = false
	r := toClient
	var refusal *clientError
	if e.refused != nil {
		r, refusal = replace, e.refused
	}
	if e.typ == 'Q' || e.typ == 'F' || e.typ == 'S' {
		// Simple protocol (or a Sync whose commit failed): ReadyForQuery
		// follows. A DEALLOCATE Query that failed may have run in part: its
		// statements count as held (a Close of one gone is no error).
		l.undo(e)
		return r, refusal, ev, nil
	}
	// Extended protocol: the server discards everything up to the next Sync.
	l.undo(e)
	l.pop()
	for l.head < len(l.q) {
		t := &l.q[l.head]
		if t.typ == 'S' {
			break
		}
		if t.typ == ownEntry {
			return r, refusal, ev, errors.New("the proxy's own statements were skipped by the server")
		}
		if t.reset {
			ev = resetSkipped
		}
		l.undo(t)
		l.head++
	}
	if l.head == len(l.q) {
		l.skip = true
	}
	l.settle()
	return r, refusal, ev, nil
}
