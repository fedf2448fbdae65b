package proxy

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// ledgerScript plays a conversation against a ledger. Words after ">" are
// client messages sent upstream, words after "<" server messages; "Q!" and
// "P!" are substitutes for refused messages, "Q^" a reset; "P~" is a Parse
// of statement p the connection is recorded as holding, "C~" and "Q~" a
// Close and a DEALLOCATE Query of statement c recorded as no longer held,
// "QA" a DEALLOCATE ALL Query, "Qq" a Query of the proxy's own whose
// answers the client does not see; "E:code" is an
// ErrorResponse with that SQLSTATE ("Ef" a FATAL one), "Z:T" a ReadyForQuery
// with that status. It returns the routes of the server messages (c to the
// client, d dropped, r replaced), the events (R reset done, K reset
// skipped, O own batch done) and the first error.
func ledgerScript(t *testing.T, l *ledger, script string) (routes, events string, err error) {
	t.Helper()
	client := true
	for _, w := range strings.Fields(script) {
		switch {
		case w == ">":
			client = true
		case w == "<":
			client = false
		case client && w == "Q!", client && w == "P!":
			l.sentRefused(w[0], newClientError(codeInsufficientPrivilege, "test", "refused"))
		case client && w == "Q^":
			if !l.sentReset(nil) {
				events += "-"
			}
		case client && w == "P~":
			l.sentParse("p", false)
		case client && (w == "C~" || w == "Q~"):
			l.sentForgetting(w[0], []stmtRecord{{name: "c"}})
		case client && w == "QA":
			l.sentForgetting('Q', forgetAll())
		case client && w == "Qq":
			l.sentQuiet()
		case client:
			l.sent(w[0])
		default:
			typ, body := serverMessage(t, w)
			r, _, ev, e := l.received(typ, body, true)
			if e != nil && err == nil {
				err = e
			}
			routes += string("cdr"[r])
			events += map[event]string{resetDone: "R", resetSkipped: "K", ownDone: "O"}[ev]
		}
	}
	return routes, events, err
}

func serverMessage(t *testing.T, w string) (byte, []byte) {
	t.Helper()
	var m pgproto3.BackendMessage
	switch {
	case strings.HasPrefix(w, "E:"):
		m = &pgproto3.ErrorResponse{Severity: "ERROR", Code: w[2:], Message: "x"}
	case w == "Ef":
		m = &pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "x"}
	case w == "E":
		m = &pgproto3.ErrorResponse{Severity: "ERROR", Code: "42601", Message: "x"}
	case strings.HasPrefix(w, "Z"):
		st := byte('I')
		if len(w) == 3 {
			st = w[2]
		}
		m = &pgproto3.ReadyForQuery{TxStatus: st}
	default:
		// Only the type matters to the ledger; the body is a placeholder.
		return w[0], []byte{0}
	}
	raw, err := m.Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	return raw[0], raw[wire.HeaderLen:]
}

func TestLedger(t *testing.T) {
	for _, tc := range []struct {
		name, script   string
		routes, events string
		idle, broken   bool
	}{
		{name: "simple query", script: "> Q < T D D C Z", routes: "ccccc", idle: true},
		{name: "empty query", script: "> Q < I Z", routes: "cc", idle: true},
		{name: "multi-statement query fails midway", script: "> Q < T D C E Z", routes: "ccccc", idle: true},
		{name: "extended query", script: "> P B D E S < 1 2 T D C Z", routes: "cccccc", idle: true},
		{name: "describe statement", script: "> D S < t T Z", routes: "ccc", idle: true},
		{name: "describe statement without rows", script: "> D S < t n Z", routes: "ccc", idle: true},
		{name: "close", script: "> C S < 3 Z", routes: "cc", idle: true},
		{name: "pipeline", script: "> P B E S P B E S < 1 2 C Z 1 2 C Z", routes: "cccccccc", idle: true},
		{name: "portal suspended", script: "> B E E S < 2 D s D C Z", routes: "cccccc", idle: true},
		{name: "still owed", script: "> P B E S < 1 2 C", routes: "ccc", idle: false},
		{name: "flush answers nothing", script: "> H H P H < 1", routes: "c", idle: true},
		{name: "function call", script: "> F < V Z", routes: "cc", idle: true},
		{name: "quiet query", script: "> Qq Q < C Z C Z", routes: "ddcc", idle: true},
		{name: "quiet query fails", script: "> Qq Q < E Z E Z", routes: "ddcc", idle: true},
		{name: "notice of a quiet query", script: "> Qq < N C Z", routes: "cdd", idle: true},
		{name: "function call fails", script: "> F < E Z", routes: "cc", idle: true},
		{name: "commit at sync fails", script: "> P B E S < 1 2 C E Z", routes: "ccccc", idle: true},

		// After an error the server discards every message up to Sync,
		// Query and FunctionCall too: they are never answered.
		{name: "error skips to sync", script: "> P B E S < E Z", routes: "cc", idle: true},
		{name: "error skips a query inside the batch", script: "> P Q S < E Z", routes: "cc", idle: true},
		{name: "error skips messages sent after it", script: "> P B < E > E Q F S < Z", routes: "cc", idle: true},
		{name: "skipping waits for sync", script: "> P < E > Q", routes: "c", idle: false},
		// asyncpg: Parse, Describe, Flush, then a Query before any Sync.
		{name: "query inside an unfinished batch runs", script: "> P D H Q < 1 t T T D C Z", routes: "ccccccc", idle: true},

		// COPY messages outside COPY are ignored by the server, however the
		// client dresses them: no answer is owed for them or the Syncs after.
		{name: "copy data outside copy", script: "> Q d S < T D C Z Z", routes: "ccccc", idle: true},
		{name: "copy done and fail outside copy", script: "> d c f S < Z", routes: "c", idle: true},
		{name: "copy data behind a query that copies nothing", script: "> Q d d c S Q < C Z Z C Z", routes: "ccccc", idle: true},

		{name: "copy in", script: "> Q < G > d d c < C Z", routes: "ccc", idle: true},
		{name: "copy in pipelined", script: "> Q d d c < G C Z", routes: "ccc", idle: true},
		// libpq's extended COPY: Sync right behind Execute, before it knows.
		{name: "extended copy in", script: "> P B D E S < 1 2 n G > d d c S < C Z", routes: "cccccc", idle: true},
		{name: "copy in fails on data", script: "> Q < G > d d c < E:22P02 Z", routes: "ccc", idle: true},
		{name: "extended copy fails on data", script: "> P B E S < 1 2 G > d c S < E:22P02 Z", routes: "ccccc", idle: true},
		{name: "copy fail", script: "> Q < G > d f < E:57014 Z", routes: "ccc", idle: true},
		{name: "sync before any data is ignored", script: "> Q < G > S d c < C Z", routes: "ccc", idle: true},
		{name: "sync amid data, copy succeeds", script: "> Q < G > d S d c < C Z", routes: "ccc", idle: true},
		{name: "sync amid data, copy fails", script: "> Q < G > d S d c < E:22P02", routes: "cd", broken: true},
		{name: "query ends copy", script: "> Q < G > d Q < E:08P01 Ef", routes: "ccc", broken: true},
		{name: "query after a data error runs", script: "> Q < G > d Q < E:22P02 Z T C Z", routes: "cccccc", idle: true},
		{name: "copy out", script: "> Q < H d d c C Z", routes: "cccccc", idle: true},
		// A run of messages of one type is kept as one entry: when its first
		// starts a COPY, the server reads the rest during the copy.
		{name: "second execute ends the copy", script: "> E E S < G E:08P01 Ef", routes: "ccc", broken: true},
		{name: "second query ends the copy", script: "> Q Q < G E:08P01 Ef", routes: "ccc", broken: true},
		{name: "second query after a data error", script: "> Q Q < G E:22P02 Z T C Z", routes: "cccccc", idle: true},
		{name: "extended copy out", script: "> P B E S < 1 2 H d c C Z", routes: "ccccccc", idle: true},

		{name: "refused query", script: "> Q! < E Z", routes: "rc", idle: true},
		{name: "refused parse skips the batch", script: "> P! B E S < E Z", routes: "rc", idle: true},
		{name: "reset", script: "> Q^ < C Z", routes: "cc", events: "R", idle: true},
		{name: "reset skipped after an error", script: "> P < E > Q^ S < Z", routes: "cc", events: "-", idle: true},
		{name: "reset consumed by a copy", script: "> Q < G > Q^ < E:08P01 Ef", routes: "ccc", events: "K", broken: true},
		{name: "reset skipped in a failed batch", script: "> P Q^ S < E Z", routes: "cc", events: "K", idle: true},

		{name: "ready for query owed nothing", script: "< Z", routes: "d", broken: true},
		{name: "answer of the wrong kind", script: "> P < 2", routes: "d", broken: true},
		{name: "error owed nothing", script: "< E", routes: "d", broken: true},
		{name: "fatal owed nothing", script: "< Ef", routes: "c", broken: true},
		{name: "row outside a query", script: "> S < D", routes: "d", broken: true},
		{name: "copy both", script: "> Q < W", routes: "d", broken: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLedger()
			routes, events, err := ledgerScript(t, l, tc.script)
			if routes != tc.routes || events != tc.events {
				t.Errorf("routes %q events %q, want %q %q", routes, events, tc.routes, tc.events)
			}
			if broken := err != nil || l.err != nil; broken != tc.broken {
				t.Errorf("broken %v (%v), want %v", broken, err, tc.broken)
			}
			if !tc.broken && l.idle() != tc.idle {
				t.Errorf("idle %v, want %v", l.idle(), tc.idle)
			}
		})
	}
}

// The proxy's own batches are answered out of the client's sight, and only
// by exactly their answers.
func TestLedgerOwnBatch(t *testing.T) {
	g := &session.Grant{Role: "authenticated", Settings: []session.Setting{{Name: "jwt.claims.sub", Value: "u1"}}}
	answers := func(b *session.Batch, nonce string) [][]byte {
		var out [][]byte
		add := func(m pgproto3.BackendMessage) {
			raw, _ := m.Encode(nil)
			out = append(out, raw)
		}
		closed := []pgproto3.BackendMessage{&pgproto3.CloseComplete{}, &pgproto3.CloseComplete{}}
		var msgs []pgproto3.BackendMessage
		msgs = append(msgs, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{CommandTag: []byte("RESET")})
		msgs = append(msgs, closed...)
		msgs = append(msgs, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.DataRow{Values: [][]byte{[]byte("1")}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")})
		msgs = append(msgs, closed...)
		msgs = append(msgs, &pgproto3.NoticeResponse{Message: "ours"}, &pgproto3.ParameterStatus{Name: "TimeZone", Value: "UTC"})
		msgs = append(msgs, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.DataRow{Values: [][]byte{[]byte("t"), []byte(nonce)}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")})
		msgs = append(msgs, closed...)
		msgs = append(msgs, &pgproto3.ReadyForQuery{TxStatus: 'I'})
		for _, m := range msgs {
			add(m)
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		nonce  func(real string) string
		want   string
		broken bool
	}{
		{name: "proved", nonce: func(n string) string { return n }, want: "ddddddddddddcddddddd O"},
		{name: "another nonce", nonce: func(string) string { return "rlsproxy_0000" }, want: "ddddddddddddcdd", broken: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLedger()
			b := session.NewUpstream(nil, 1, g).Reinstall('I')
			l.sentOwn(b)
			var routes, events string
			var err error
			for _, raw := range answers(b, tc.nonce(batchNonce(t, b))) {
				r, _, ev, e := l.received(raw[0], raw[wire.HeaderLen:], true)
				if e != nil {
					err = e
					break
				}
				routes += string("cdr"[r])
				if ev == ownDone {
					events += " O"
				}
			}
			if routes+events != tc.want || (err != nil) != tc.broken {
				t.Fatalf("routes %q, err %v; want %q, broken %v", routes+events, err, tc.want, tc.broken)
			}
			if !tc.broken && !l.reusable() {
				t.Fatal("not reusable after the batch was proved")
			}
		})
	}
}

// batchNonce finds the nonce a batch binds as its last parameter.
func batchNonce(t *testing.T, b *session.Batch) string {
	t.Helper()
	var nonce string
	for rest := b.Frames; len(rest) > 0; {
		typ, size, ok, err := wire.Header(rest)
		if !ok || err != nil {
			t.Fatal("malformed batch")
		}
		if typ == 'B' {
			var m pgproto3.Bind
			if err := m.Decode(rest[wire.HeaderLen:size]); err != nil {
				t.Fatal(err)
			}
			if len(m.Parameters) == 2 {
				nonce = string(m.Parameters[1])
			}
		}
		rest = rest[size:]
	}
	return nonce
}

// A client that sends without reading cannot grow the ledger without
// bound: the relay stops reading it when the ledger is full.
func TestLedgerFull(t *testing.T) {
	l := newLedger()
	l.maxSize = 4
	for _, typ := range []byte("PBPB") {
		if l.full() {
			t.Fatal("full too early")
		}
		l.sent(typ)
	}
	if !l.full() {
		t.Fatal("not full")
	}
	if _, _, _, err := l.received('1', nil, true); err != nil || l.full() {
		t.Fatalf("after an answer: err %v, full %v", err, l.full())
	}
}

// FuzzLedger feeds any interleaving of client and server message types:
// the ledger never panics, and once it reports an error it keeps it.
func FuzzLedger(f *testing.F) {
	f.Add([]byte("PBESa12CZ"))
	f.Add([]byte("QdScGDcCZZ"))
	f.Fuzz(func(t *testing.T, script []byte) {
		l := newLedger()
		var broken error
		const clientTypes, serverTypes = "QPBDECSHFdcf", "123tTnDCIsGHWdcVNSAZEK"
		for i := 0; i+1 < len(script); i += 2 {
			if script[i]%2 == 0 {
				l.sent(clientTypes[int(script[i+1])%len(clientTypes)])
				continue
			}
			typ := serverTypes[int(script[i+1])%len(serverTypes)]
			body := []byte{'I'}
			if typ == 'E' {
				raw, _ := (&pgproto3.ErrorResponse{Severity: "ERROR", Code: "08P01"}).Encode(nil)
				body = raw[wire.HeaderLen:]
			}
			_, _, _, err := l.received(typ, body, true)
			if broken != nil && err == nil {
				t.Fatalf("error %v forgotten", broken)
			}
			if err != nil {
				broken = err
			}
		}
		_ = l.idle()
	})
}

// A Parse, Close or DEALLOCATE the server fails or discards unread gives
// back the record of statements it made as it was sent: "p-" not held,
// "c+" held after all, "*" unknown (a DEALLOCATE ALL).
func TestLedgerUndoesStatementRecords(t *testing.T) {
	for _, tc := range []struct{ name, script, undone string }{
		{"all run", "> P~ C~ S < 1 3 Z > Q~ < C Z > QA < C Z", ""},
		{"parse fails", "> P~ S < E Z", "p-"},
		{"close skipped after an error", "> P C~ S < E Z", "c+"},
		{"close sent while the server skips", "> P < E > C~ S < Z", "c+"},
		{"parse skipped by an earlier error", "> P P~ B S < E Z", "p-"},
		{"close past the sync runs", "> P S C~ S < E Z 3 Z", ""},
		{"deallocate query fails", "> Q~ < E Z", "c+"},
		{"deallocate all fails", "> QA < E Z", "*"},
		{"close read by a copy", "> Q < G > d C~ < E:08P01 Z", "c+"},
		{"parse read by a copy", "> Q < G > d P~ < E:08P01 Z", "p-"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLedger()
			if _, _, err := ledgerScript(t, l, tc.script); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range l.takeUndone() {
				switch {
				case r.all:
					got = append(got, "*")
				case r.held:
					got = append(got, r.name+"+")
				default:
					got = append(got, r.name+"-")
				}
			}
			if s := strings.Join(got, " "); s != tc.undone {
				t.Errorf("undone %q, want %q", s, tc.undone)
			}
			if !l.idle() {
				t.Error("the ledger is not idle at the end")
			}
		})
	}
}

// queued tells whether the server was sent more than the statement it runs,
// as the expiry must know (relay.expire): a second Execute, Query or
// FunctionCall still owed, however the messages run together.
func TestLedgerQueued(t *testing.T) {
	for _, tc := range []struct {
		script string
		want   bool
	}{
		{"", false},
		{"> Q", false},
		{"> Q Q", true},
		{"> P B E S", false},
		{"> P B E S P B E S", true},
		{"> P B E", false},
		{"> P B E P B E", true},
		{"> P B E P B D C", false},
		{"> Q < T D C Z > Q", false},
		{"> Q S", false},
		{"> Q P B E", true},
		{"> F Q", true},
		{"> Q Q < C Z", false},
	} {
		l := newLedger()
		if _, _, err := ledgerScript(t, l, tc.script); err != nil {
			t.Fatalf("%q: %v", tc.script, err)
		}
		if got := l.queued(); got != tc.want {
			t.Errorf("%q: queued %v, want %v", tc.script, got, tc.want)
		}
	}
}
