package proxy_test

// A property test of the pool's isolation: whatever a client sends, in any
// order, split or pipelined, and however it leaves, the next client on the
// same upstream connection runs with exactly its own identity and none of
// the previous session's state.
//
// Each iteration, user A opens a raw session through a proxy with one
// pooled upstream connection, sends a random sequence of frames (simple and
// extended protocol, COPY in and out, COPY messages outside COPY, resets,
// identity changes the guard refuses or, with the guard off, lets through,
// FunctionCall, malformed frames), sometimes reading the answers, and
// leaves in one of several ways. User B then connects with pgx and checks
// role, claims, signed claims, rows, prepared statements, LISTENs,
// temporary tables, advisory locks, cursors and transaction status. Every
// check must hold whether or not B runs on A's backend; the test also
// requires that B often does, or it would prove nothing.
//
// Deterministic: RLSPROXY_PROPERTY_SEED sets the seed (default below), and
// iteration i draws its sequence from (seed, i) alone, so a failure is
// replayed by seed and iteration. RLSPROXY_PROPERTY_ITERATIONS sets the
// iterations per mode. A failing sequence is shrunk and logged as a
// compact list of frames.

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

const (
	propertyDefaultSeed       = 20240607
	propertyDefaultIterations = 150
	// propertyMinReuse is the least share of iterations in which B must
	// run on A's backend for a mode to count as tested.
	propertyMinReuse = 0.25
	// propertyTag marks the rows and large objects the test leaves, which
	// its cleanup deletes.
	propertyTag = "ptest"
)

// propertySubs are the users A and B are drawn from: user1 and user2 own
// rows in notes and signed_notes, user3 and user4 none.
var propertySubs = []string{"user1", "user2", "user3", "user4"}

func TestProperty(t *testing.T) {
	seed := uint64(propertyDefaultSeed)
	if s := os.Getenv("RLSPROXY_PROPERTY_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("RLSPROXY_PROPERTY_SEED=%q: %v", s, err)
		}
		seed = v
	}
	iterations := propertyDefaultIterations
	if s := os.Getenv("RLSPROXY_PROPERTY_ITERATIONS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			t.Fatalf("RLSPROXY_PROPERTY_ITERATIONS=%q: want a positive number", s)
		}
		iterations = v
	}
	t.Logf("seed %d (RLSPROXY_PROPERTY_SEED), %d iterations per mode (RLSPROXY_PROPERTY_ITERATIONS)", seed, iterations)
	propertyCleanup(t)

	modes := []struct {
		name string
		opts []proxytest.Option
	}{
		{"guard on", []proxytest.Option{proxytest.Pooled(1, 1), withSigner}},
		{"guard off", []proxytest.Option{proxytest.Pooled(1, 1), proxytest.GuardOff, withSigner}},
		{"goroutine relay", []proxytest.Option{proxytest.Pooled(1, 1), withSigner, proxytest.GoroutineRelay}},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			clock := &ptClock{}
			p := proxytest.Start(t, pg, append(m.opts, func(c *proxytest.Setup) { c.Now = clock.now })...)
			h := newPropertyHarness(t, p, clock)
			t.Run("stray CopyData attack", func(t *testing.T) { testStrayCopyDataAttack(t, h) })
			t.Run("random sequences", func(t *testing.T) { testRandomSequences(t, h, seed, iterations) })
		})
	}
}

// propertyCleanup deletes, when the test ends, the notes and large objects
// its sessions may have committed, so that other tests see the seed rows.
func propertyCleanup(t *testing.T) {
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, pg.SuperDSN(demo.Database))
	if err != nil {
		t.Fatal(err)
	}
	var maxLO int64
	err = admin.QueryRow(ctx, "SELECT coalesce(max(oid::int8), 0) FROM pg_largeobject_metadata").Scan(&maxLO)
	admin.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		err := pg.Exec(ctx, demo.Database, fmt.Sprintf(`
			DELETE FROM notes WHERE content LIKE '%s%%';
			SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid::int8 > %d;`, propertyTag, maxLO))
		if err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// The original bug: CopyData outside COPY made the relay believe the server
// was in COPY (so that it had ignored the Syncs since the last Execute) and
// miscount the answers owed; the connection went back to the pool with
// answers unread, and the next user's round trips read the previous
// user's. Each variant runs four times (user1 and user2 both ways, and a
// user without rows before each), with and without reading the answers
// before leaving, so that the connection is reused in some. The variant
// with three short batches fails against the relay before the ledger
// (commit eb2f5a1): B's statements get the reset's answers.
func testStrayCopyDataAttack(t *testing.T, h *propertyHarness) {
	q := func(sql string) ptStep { return ptFrame(fmt.Sprintf("Q%q", sql), &pgproto3.Query{String: sql}) }
	stray := func() []ptStep {
		return []ptStep{
			q("SELECT 1"),
			ptFrame(`d"stray"`, &pgproto3.CopyData{Data: []byte("stray")}),
			ptFrame("S", &pgproto3.Sync{}),
			ptFrame("c", &pgproto3.CopyDone{}),
		}
	}
	extended := []ptStep{
		ptFrame(`P"SELECT 1"`, &pgproto3.Parse{Query: "SELECT 1"}),
		ptFrame("B", &pgproto3.Bind{}),
		ptFrame("E", &pgproto3.Execute{}),
		ptFrame("S", &pgproto3.Sync{}),
	}
	var forged []ptStep
	for _, sql := range []string{"SELECT true", "SELECT true", "SELECT 1, 'authenticated'"} {
		forged = append(forged, ptParse("", sql), ptFrame("B", &pgproto3.Bind{}), ptFrame("E", &pgproto3.Execute{}),
			ptFrame("S", &pgproto3.Sync{}), ptFrame(`d"x"`, &pgproto3.CopyData{Data: []byte("x")}), ptFrame("c", &pgproto3.CopyDone{}))
	}
	for i := range forged {
		forged[i].hold = true // one write, Terminate right behind it
	}
	variants := []struct {
		name string
		c    ptCase
	}{
		{"pipelined, Terminate at once", ptCase{steps: stray(), end: endTerminate}},
		{"pipelined, answers read, Terminate", ptCase{steps: append(stray(), ptRead(30*time.Millisecond)), end: endTerminate}},
		{"pipelined, clean end", ptCase{steps: stray(), end: endClean}},
		// A relay that took the Sync behind an Execute for one the server
		// ignored in COPY counts one ReadyForQuery too few: it believes the
		// server idle at once, and the connection goes back to the pool
		// with the batch's answers unread.
		{"after an extended batch, Terminate at once", ptCase{steps: append(extended, stray()[1:]...), end: endTerminate}},
		{"after an extended batch, answers read", ptCase{steps: append(append(extended, stray()[1:]...), ptRead(30*time.Millisecond)), end: endTerminate}},
		// Three batches, each one ReadyForQuery short, whose rows forge
		// what a reset and an install that count answers would read: a
		// proof "t", and a role "authenticated". Against eb2f5a1 the pool
		// took the connection back, the install read A's rows as its own,
		// and B's check was answered with the reset's answers ("no rows in
		// result set").
		{"three short batches forging the reset's and the install's answers", ptCase{steps: forged, end: endTerminate}},
		{"a reset behind it", ptCase{steps: append(stray(), q("DISCARD ALL"), q("SELECT current_user"), ptRead(30*time.Millisecond)), end: endTerminate}},
		// A count one ReadyForQuery short reaches zero while the next
		// statement runs; a reset that counts answers would read its row
		// "t" as the proof's.
		{"a statement behind it, Terminate while it runs", ptCase{steps: append(stray(), ptRead(30*time.Millisecond),
			q("SELECT true FROM pg_sleep(0.05)")), end: endTerminate}},
	}
	reused, runs := 0, 0
	for _, v := range variants {
		for i := range 4 {
			a, b := propertySubs[i%2], propertySubs[1-i%2]
			if i >= 2 {
				a, b = propertySubs[2+i%2], propertySubs[i%2]
			}
			out, err := h.run(a, b, v.c)
			if err != nil {
				t.Fatalf("%s, A=%s B=%s: %v\nsequence: %s", v.name, a, b, err, v.c)
			}
			runs++
			if out.reused {
				reused++
			}
		}
	}
	t.Logf("stray CopyData attack: B ran on A's backend in %d of %d runs", reused, runs)
	if reused == 0 {
		t.Fatalf("B never ran on A's backend: the attack proved nothing")
	}
}

func testRandomSequences(t *testing.T, h *propertyHarness, seed uint64, iterations int) {
	var st struct{ reused, proxyEnded, clean, cleanReused, expired, expiredReused int }
	start := time.Now()
	baseline := -1
	for i := range iterations {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		a := propertySubs[rng.IntN(len(propertySubs))]
		b := propertySubs[rng.IntN(len(propertySubs)-1)]
		if b == a {
			b = propertySubs[len(propertySubs)-1]
		}
		c := genPropertyCase(rng)
		out, err := h.run(a, b, c)
		if err != nil {
			t.Errorf("seed %d iteration %d, A=%s B=%s: %v\nsequence (%d frames): %s", seed, i, a, b, err, c.frames(), c)
			h.shrink(t, a, b, c)
			return
		}
		if out.reused {
			st.reused++
		}
		if out.proxyEnded {
			st.proxyEnded++
		}
		if out.expired {
			st.expired++
			if out.reused {
				st.expiredReused++
			}
		}
		if c.end == endClean {
			st.clean++
			if out.reused {
				st.cleanReused++
			}
		}
		if i == 0 {
			baseline = runtime.NumGoroutine()
		}
	}
	ratio := float64(st.reused) / float64(iterations)
	t.Logf("%d iterations in %v: B ran on A's backend in %d (%.0f%%); clean endings %d, of which reused %d; "+
		"sessions ended by the proxy %d, of which at the token's expiry %d (reused %d)",
		iterations, time.Since(start).Round(time.Millisecond), st.reused, 100*ratio, st.clean, st.cleanReused,
		st.proxyEnded, st.expired, st.expiredReused)
	if ratio < propertyMinReuse {
		t.Errorf("B ran on A's backend in only %.0f%% of iterations (want at least %.0f%%): the property is barely tested", 100*ratio, 100*propertyMinReuse)
	}
	// A session that leaks a goroutine leaks one per iteration.
	h.checkGoroutines(t, baseline, iterations)
}

// propertyHarness runs cases against one proxy.
type propertyHarness struct {
	t      *testing.T
	p      *proxytest.Proxy
	clock  *ptClock
	tokens map[string]string
	exp    map[string]time.Time // the tokens' exp
}

func newPropertyHarness(t *testing.T, p *proxytest.Proxy, clock *ptClock) *propertyHarness {
	h := &propertyHarness{t: t, p: p, clock: clock, tokens: map[string]string{}, exp: map[string]time.Time{}}
	for _, sub := range propertySubs {
		tok := p.Token(t, sub)
		h.tokens[sub] = tok
		var claims struct {
			Exp int64 `json:"exp"`
		}
		parts := strings.Split(tok, ".")
		payload, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err != nil || json.Unmarshal(payload, &claims) != nil || claims.Exp == 0 {
			t.Fatalf("no exp in the token of %s: %v", sub, err)
		}
		h.exp[sub] = time.Unix(claims.Exp, 0)
	}
	return h
}

// ptClock is the proxy's clock: it runs ahead by off, so that a session
// starting while it does finds its token about to expire.
type ptClock struct{ off atomic.Int64 }

func (c *ptClock) now() time.Time { return time.Now().Add(time.Duration(c.off.Load())) }

type ptOutcome struct {
	reused     bool // B ran on A's backend
	proxyEnded bool // the proxy ended A's session (EOF or FATAL)
	expired    bool // it did so because A's token expired
}

// run plays case c as A, then checks B. A non-nil error is a violation of
// the property (or a proxy that hangs).
func (h *propertyHarness) run(a, b string, c ptCase) (ptOutcome, error) {
	var out ptOutcome
	if err := h.settled(); err != nil {
		return out, fmt.Errorf("before A: %w", err)
	}
	if c.expire > 0 {
		// The proxy arms the expiry timer as the session starts, at exp
		// by its clock: c.expire from now.
		h.clock.off.Store(int64(h.exp[a].Sub(time.Now().Add(c.expire))))
	}
	cl, err := ptStartup(h.p.Addr, a, h.tokens[a])
	if err != nil {
		h.clock.off.Store(0)
		return out, fmt.Errorf("A's session (%s) failed to start: %w", a, err)
	}
	defer cl.conn.Close()
	aPid, err := cl.backendPID()
	h.clock.off.Store(0) // the session runs: its timer is armed
	if err != nil && !(c.expire > 0 && cl.ended) {
		return out, fmt.Errorf("A's SELECT pg_backend_pid(): %w", err)
	}
	cl.play(c)
	out.proxyEnded, out.expired = cl.ended, cl.fatalCode == "28P01"
	if err := h.settled(); err != nil {
		return out, fmt.Errorf("after A left: %w", err)
	}
	bPid, err := h.checkB(b)
	if err != nil {
		return out, fmt.Errorf("B (%s) after A (%s, backend %d): %w", b, a, aPid, err)
	}
	out.reused = bPid == aPid
	return out, nil
}

// settled waits until no session holds the pool's one connection: it is
// idle in the pool, or closed. A session the proxy keeps after its client
// left is a leak.
func (h *propertyHarness) settled() error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		open, idle := h.p.Config.Pool.Stats()
		if idle == 1 || open == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the proxy still holds the upstream connection 5s after the client left (open %d, idle %d)", open, idle)
		}
		time.Sleep(time.Millisecond)
	}
}

// propertyCheckSQL reads, in one statement of the simple protocol (no
// prepared statement of B's own), everything of B's session that must be
// B's alone.
const propertyCheckSQL = `SELECT pg_backend_pid(), current_user::text, session_user::text,
	coalesce(current_setting('jwt.claims.sub', true), '<null>'),
	coalesce(current_setting('request.jwt.claims', true)::jsonb->>'sub', '<null>'),
	coalesce(auth.user_id()::text, '<null>'),
	(SELECT coalesce(string_agg(DISTINCT user_id, ','), '') FROM notes),
	(SELECT coalesce(string_agg(user_id, ',' ORDER BY user_id), '') FROM signed_notes),
	(SELECT count(*) FROM pg_prepared_statements),
	(SELECT count(*) FROM pg_listening_channels()),
	(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
	(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
	(SELECT count(*) FROM pg_cursors),
	current_setting('statement_timeout'), current_setting('application_name')`

// checkB connects as sub and checks its session; it returns B's backend.
func (h *propertyHarness) checkB(sub string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(h.p.DSN(sub, h.tokens[sub]))
	if err != nil {
		return 0, err
	}
	var mu sync.Mutex
	var notified []string
	cfg.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) {
		mu.Lock()
		notified = append(notified, n.Channel)
		mu.Unlock()
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return 0, fmt.Errorf("B's session failed to start: %w", err)
	}
	defer conn.Close(context.Background())
	if s := conn.PgConn().TxStatus(); s != 'I' {
		return 0, fmt.Errorf("B's session starts in transaction status %q", s)
	}
	var (
		pid                                           int
		cu, su, gucSub, claimsSub, authSub, notes, sn string
		prepared, listening, temp, locks, cursors     int
		timeout, appName                              string
	)
	err = conn.QueryRow(ctx, propertyCheckSQL, pgx.QueryExecModeSimpleProtocol).Scan(&pid, &cu, &su, &gucSub, &claimsSub, &authSub,
		&notes, &sn, &prepared, &listening, &temp, &locks, &cursors, &timeout, &appName)
	if err != nil {
		return 0, fmt.Errorf("B's check: %w", err)
	}
	var bad []string
	want := func(what, got, want string) {
		if got != want {
			bad = append(bad, fmt.Sprintf("%s %q, want %q", what, got, want))
		}
	}
	want("current_user", cu, "authenticated")
	// Every mode signs, so sessions log in as the role's own login.
	want("session_user", su, session.LoginFor("authenticator", "authenticated"))
	want("jwt.claims.sub", gucSub, sub)
	want("request.jwt.claims sub", claimsSub, sub)
	want("auth.user_id()", authSub, sub)
	switch sub {
	case "user1", "user2":
		want("owners of visible notes", notes, sub)
		want("owners of visible signed_notes", sn, sub)
	default:
		if notes != "" && notes != sub {
			bad = append(bad, fmt.Sprintf("owners of visible notes %q, want %q or none", notes, sub))
		}
		want("owners of visible signed_notes", sn, "")
	}
	for _, n := range []struct {
		what string
		n    int
	}{{"prepared statements", prepared}, {"listening channels", listening}, {"temporary relations", temp},
		{"advisory locks", locks}, {"cursors", cursors}} {
		if n.n != 0 {
			bad = append(bad, fmt.Sprintf("%d %s", n.n, n.what))
		}
	}
	want("statement_timeout", timeout, "0")
	if appName == propertyTag+"_a" {
		bad = append(bad, "application_name set by A")
	}
	if s := conn.PgConn().TxStatus(); s != 'I' {
		bad = append(bad, fmt.Sprintf("transaction status %q after the check", s))
	}
	mu.Lock()
	if len(notified) > 0 {
		bad = append(bad, fmt.Sprintf("notifications on %v", notified))
	}
	mu.Unlock()
	if len(bad) > 0 {
		return pid, fmt.Errorf("backend %d: %s", pid, strings.Join(bad, "; "))
	}
	return pid, nil
}

// purge makes the proxy close its pooled connection: a session that sends
// an unknown frame is ended by the proxy, and its connection not reused.
func (h *propertyHarness) purge() {
	_ = h.settled()
	cl, err := ptStartup(h.p.Addr, "user1", h.tokens["user1"])
	if err != nil {
		return
	}
	_ = cl.write([]byte{'z', 0, 0, 0, 4})
	cl.read(20*time.Millisecond, time.Second, nil)
	cl.conn.Close()
	_ = h.settled()
}

// shrink looks for a shorter sequence that still breaks the property, and
// logs it.
func (h *propertyHarness) shrink(t *testing.T, a, b string, c ptCase) {
	fails := func(c ptCase) error {
		h.purge()
		_, err := h.run(a, b, c)
		return err
	}
	reproduced := 0
	for range 3 {
		if fails(c) != nil {
			reproduced++
		}
	}
	t.Logf("the failing case failed again in %d of 3 reruns", reproduced)
	if reproduced == 0 {
		return
	}
	// Bounded in tries and in time: a case that hangs costs seconds a try.
	tries, deadline := 0, time.Now().Add(90*time.Second)
	more := func() bool { return tries < 300 && time.Now().Before(deadline) }
	for chunk := len(c.steps) / 2; chunk >= 1 && more(); chunk /= 2 {
		for i := 0; i+chunk <= len(c.steps) && more(); {
			cand := c
			cand.steps = append(append([]ptStep{}, c.steps[:i]...), c.steps[i+chunk:]...)
			tries++
			if fails(cand) != nil {
				c = cand
			} else {
				i += chunk
			}
		}
	}
	if c.expire > 0 {
		cand := c
		cand.expire = 0
		if fails(cand) != nil {
			c = cand
		}
	}
	for _, e := range []ptEnding{endTerminate, endClose} {
		if c.end != e {
			cand := c
			cand.end = e
			if fails(cand) != nil {
				c = cand
				break
			}
		}
	}
	var last error
	again := 0
	for range 5 {
		if err := fails(c); err != nil {
			again, last = again+1, err
		}
	}
	t.Errorf("shrunk after %d tries to %d frames, fails in %d of 5 reruns (A=%s B=%s): %s\nlast error: %v",
		tries, c.frames(), again, a, b, c, last)
	h.purge()
}

// checkGoroutines fails when the goroutines have grown with the sessions.
func (h *propertyHarness) checkGoroutines(t *testing.T, baseline, sessions int) {
	if baseline < 0 {
		return
	}
	const slack = 10
	var n int
	for deadline := time.Now().Add(3 * time.Second); ; {
		n = runtime.NumGoroutine()
		if n <= baseline+slack || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n > baseline+slack {
		var sb strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&sb, 1)
		t.Errorf("%d goroutines after %d sessions, %d after the first: a leak\n%s", n, 2*sessions, baseline, sb.String())
	}
}

// A case is A's frames and reads, then how A leaves.
type ptCase struct {
	steps []ptStep
	end   ptEnding
	// expire, if set, is when A's token expires after A's session starts:
	// the proxy ends the session once the server has answered what it was
	// sent, and may keep the connection.
	expire time.Duration
}

type ptStep struct {
	label string
	raw   []byte        // a frame (or bytes) to send; nil for a read
	read  time.Duration // a read: until no bytes come for this long
	hold  bool          // kept to be written with the next frames (pipelined)
	split bool          // written in two parts
}

type ptEnding int

const (
	endClean     ptEnding = iota // Sync, read until the answers stop, Terminate
	endTerminate                 // Terminate at once
	endClose                     // close the socket (FIN)
	endReset                     // close with SO_LINGER 0 (RST)
	endPartial                   // half a Query, then Terminate, then close
	endIdle                      // stay idle a little, then close
)

var ptEndingNames = [...]string{"clean(S,read,X)", "X", "close", "RST", "partial-Q,X,close", "idle,close"}

func (c ptCase) frames() int {
	n := 0
	for _, s := range c.steps {
		if s.raw != nil {
			n++
		}
	}
	return n
}

func (c ptCase) String() string {
	var parts []string
	for _, s := range c.steps {
		l := s.label
		if s.raw == nil {
			l = fmt.Sprintf("read(%v)", s.read)
		}
		if s.split {
			l += "/split"
		}
		if s.hold {
			l += "+"
		}
		parts = append(parts, l)
	}
	s := strings.Join(parts, " ") + " ; end " + ptEndingNames[c.end]
	if c.expire > 0 {
		s += fmt.Sprintf(" ; token expires %v after the start", c.expire)
	}
	return s
}

func ptFrame(label string, m pgproto3.FrontendMessage) ptStep {
	raw, err := m.Encode(nil)
	if err != nil {
		panic(err)
	}
	return ptStep{label: label, raw: raw}
}

func ptRaw(label string, raw []byte) ptStep { return ptStep{label: label, raw: raw} }

func ptRead(quiet time.Duration) ptStep { return ptStep{read: quiet} }

// The vocabulary.

var ptQueries = []string{
	"SELECT 1",
	"SELECT current_user, session_user, current_setting('jwt.claims.sub', true)",
	"SELECT current_setting('request.jwt.claims', true), auth.user_id()",
	"SELECT count(*) FROM notes",
	"SELECT pg_sleep(0.01)",
	"SELECT true", "SELECT 1, 'authenticated'", // what a reset's proof and an install read
	"BEGIN", "COMMIT", "ROLLBACK",
	"SELEC 1",
	"SELECT 1/0",
	"",
	"COPY (SELECT 1) TO STDOUT",
	"COPY (SELECT generate_series(1, 3)) TO STDOUT",
	"COPY pt_copy FROM STDIN",
	"COPY notes(content) FROM STDIN",
	"CREATE TEMP TABLE IF NOT EXISTS pt_copy (v text)",
	"CREATE TEMP TABLE pt_tmp (x int)",
	"INSERT INTO notes (content) VALUES ('" + propertyTag + " insert')",
	"LISTEN pt_chan",
	"NOTIFY pt_chan, 'x'",
	"SELECT pg_advisory_lock(90417)",
	"SELECT pg_advisory_xact_lock(90418)",
	"PREPARE pt_stmt AS SELECT 1",
	"EXECUTE pt_stmt",
	"DECLARE pt_cur CURSOR WITH HOLD FOR SELECT 1",
	"DISCARD ALL",
	"RESET ALL",
	"RESET ROLE",
	"SET ROLE admin",
	"SET jwt.claims.sub = 'other'",
	`SET request.jwt.claims = '{"sub":"other"}'`,
	"SELECT set_config('jwt.claims.sub', 'other', false)",
	"SET ROLE NONE",
	"SET SESSION AUTHORIZATION authenticator",
	"SELECT set_config('role', 'admin', false)",
	"SET statement_timeout = 1234",
	"SET application_name = '" + propertyTag + "_a'",
	"SET standard_conforming_strings = off",
	"SET client_encoding = 'LATIN1'",
	"SET client_encoding = 'SJIS'", // a client-only encoding: the guard ends the session
	"SAVEPOINT pt_sp", "ROLLBACK TO SAVEPOINT pt_sp", "RELEASE SAVEPOINT pt_sp",
	"SELECT repeat('x', 100000)", // an answer larger than the relay's buffer
	"SELECT 1; SELECT 2",
	"SELECT 1; SELEC 2; SELECT 3",
	"BEGIN; SELECT 1",
	"SELECT 1; COMMIT",
	"SET ROLE admin; SELECT current_user",
	"DISCARD ALL; SELECT current_user",
	"COPY (SELECT 1) TO STDOUT; SELECT 2",
	"COPY pt_copy FROM STDIN; SELECT 1",
	"SELECT 1; RESET ALL; SELECT current_setting('jwt.claims.sub', true)",
}

var ptParses = []string{
	"SELECT $1::int",
	"SELECT true", "SELECT 1, 'authenticated'",
	"SELECT current_user",
	"SELECT pg_sleep(0.01)",
	"SELECT generate_series(1, 5)",
	"SELECT 1/0",
	"SELEC 1",
	"BEGIN", "COMMIT",
	"COPY (SELECT 1) TO STDOUT",
	"COPY pt_copy FROM STDIN",
	"SET ROLE admin",
	"SELECT set_config('jwt.claims.sub', 'other', false)",
	"DISCARD ALL",
	"LISTEN pt_chan",
	"INSERT INTO notes (content) VALUES ('" + propertyTag + " parse')",
}

var ptCopyRows = []string{propertyTag + " copy\n", propertyTag + " a\n" + propertyTag + " b\n", "x\ty\n", "\\.\n"}

func pick[T any](rng *rand.Rand, xs []T) T { return xs[rng.IntN(len(xs))] }

func ptQuery(sql string) ptStep {
	return ptFrame(fmt.Sprintf("Q%q", sql), &pgproto3.Query{String: sql})
}

func ptParse(name, sql string) ptStep {
	return ptFrame(fmt.Sprintf("P[%s]%q", name, sql), &pgproto3.Parse{Name: name, Query: sql})
}

func ptBind(portal, stmt string, params ...string) ptStep {
	m := &pgproto3.Bind{DestinationPortal: portal, PreparedStatement: stmt}
	for _, p := range params {
		m.Parameters = append(m.Parameters, []byte(p))
	}
	return ptFrame(fmt.Sprintf("B[%s<-%s]%v", portal, stmt, params), m)
}

func ptExecute(portal string, max uint32) ptStep {
	return ptFrame(fmt.Sprintf("E[%s]/%d", portal, max), &pgproto3.Execute{Portal: portal, MaxRows: max})
}

func ptCopyData(rng *rand.Rand) ptStep {
	row := pick(rng, ptCopyRows)
	return ptFrame(fmt.Sprintf("d%q", row), &pgproto3.CopyData{Data: []byte(row)})
}

// ptRandomFrame draws one frame of the vocabulary.
func ptRandomFrame(rng *rand.Rand) ptStep {
	stmt := pick(rng, []string{"", "pt_s1", "pt_s2"})
	portal := pick(rng, []string{"", "pt_p1"})
	switch r := rng.IntN(100); {
	case r < 28:
		return ptQuery(pick(rng, ptQueries))
	case r < 40:
		return ptParse(stmt, pick(rng, ptParses))
	case r < 50:
		if rng.IntN(3) == 0 {
			return ptBind(portal, stmt, "42")
		}
		return ptBind(portal, stmt)
	case r < 55:
		if rng.IntN(2) == 0 {
			return ptFrame("D[S "+stmt+"]", &pgproto3.Describe{ObjectType: 'S', Name: stmt})
		}
		return ptFrame("D[P "+portal+"]", &pgproto3.Describe{ObjectType: 'P', Name: portal})
	case r < 63:
		return ptExecute(portal, pick(rng, []uint32{0, 0, 1, 2}))
	case r < 66:
		if rng.IntN(2) == 0 {
			return ptFrame("C[S "+stmt+"]", &pgproto3.Close{ObjectType: 'S', Name: stmt})
		}
		return ptFrame("C[P "+portal+"]", &pgproto3.Close{ObjectType: 'P', Name: portal})
	case r < 76:
		return ptFrame("S", &pgproto3.Sync{})
	case r < 79:
		return ptFrame("H", &pgproto3.Flush{})
	case r < 83:
		switch rng.IntN(3) {
		case 0: // set_config: refused with the guard on
			return ptFrame("F2078(jwt.claims.sub,other,false)", &pgproto3.FunctionCall{Function: 2078, ArgFormatCodes: []uint16{0},
				Arguments: [][]byte{[]byte("jwt.claims.sub"), []byte("other"), []byte("false")}})
		case 1: // lo_creat(INV_WRITE): allowed
			return ptFrame("F957(131072)", &pgproto3.FunctionCall{Function: 957, ArgFormatCodes: []uint16{0},
				Arguments: [][]byte{[]byte("131072")}})
		default: // lo_creat with a binary argument and result
			return ptFrame("F957(bin -1)", &pgproto3.FunctionCall{Function: 957, ArgFormatCodes: []uint16{1},
				Arguments: [][]byte{binary.BigEndian.AppendUint32(nil, 0xffffffff)}, ResultFormatCode: 1})
		}
	case r < 91:
		return ptCopyData(rng)
	case r < 95:
		return ptFrame("c", &pgproto3.CopyDone{})
	case r < 97:
		return ptFrame("f", &pgproto3.CopyFail{Message: "pt abort"})
	case r < 98:
		return ptLarge(rng)
	default:
		return ptMalformed(rng)
	}
}

// ptLarge draws a frame larger than the relay's 32 KiB buffers, which it
// streams through, or, for a statement the guard must read, gathers whole
// (and, from the event loop, hands to goroutines of its own).
func ptLarge(rng *rand.Rand) ptStep {
	pad := "/* " + strings.Repeat("p", 40<<10) + " */"
	switch rng.IntN(4) {
	case 0:
		return ptFrame("Q(SET statement_timeout, 40 KiB)", &pgproto3.Query{String: "SET statement_timeout = 1234 " + pad})
	case 1:
		return ptFrame("Q(SET ROLE admin, 40 KiB)", &pgproto3.Query{String: "SET ROLE admin " + pad})
	case 2:
		return ptFrame("P[](SELECT current_user, 40 KiB)", &pgproto3.Parse{Query: "SELECT current_user " + pad})
	default:
		return ptFrame("d(80 KiB)", &pgproto3.CopyData{Data: []byte(strings.Repeat(propertyTag+" big\n", 8<<10))})
	}
}

// ptMalformed draws a frame no driver sends.
func ptMalformed(rng *rand.Rand) ptStep {
	frame := func(typ byte, body string) []byte {
		b := append([]byte{typ}, binary.BigEndian.AppendUint32(nil, uint32(4+len(body)))...)
		return append(b, body...)
	}
	switch rng.IntN(6) {
	case 0:
		return ptRaw("raw:z(unknown type)", frame('z', "junk"))
	case 1:
		return ptRaw("raw:Q(length 2)", []byte{'Q', 0, 0, 0, 2})
	case 2:
		return ptRaw("raw:Q(no NUL)", frame('Q', "SELECT 1"))
	case 3:
		return ptRaw("raw:B(truncated)", frame('B', "\x00"))
	case 4:
		return ptRaw("raw:D(subtype X)", frame('D', "X\x00"))
	default:
		return ptRaw("raw:E(truncated)", frame('E', "\x00\x00"))
	}
}

// ptSnippet draws a coherent run of frames, for the states random frames
// rarely reach: in and out of COPY, whole extended batches, transactions.
func ptSnippet(rng *rand.Rand) []ptStep {
	sync := ptFrame("S", &pgproto3.Sync{})
	done := ptFrame("c", &pgproto3.CopyDone{})
	switch rng.IntN(7) {
	case 0, 1: // COPY FROM STDIN in the simple protocol, ended or not, maybe interrupted
		s := []ptStep{ptQuery(pick(rng, []string{"COPY pt_copy FROM STDIN", "COPY notes(content) FROM STDIN"}))}
		for range rng.IntN(3) {
			s = append(s, ptCopyData(rng))
		}
		switch rng.IntN(6) {
		case 0:
			s = append(s, ptFrame("f", &pgproto3.CopyFail{Message: "pt abort"}))
		case 1:
			s = append(s, ptQuery("SELECT 1")) // ends the copy with an error
		case 2:
			s = append(s, sync, done) // Sync is ignored in COPY
		case 3: // left open
		default:
			s = append(s, done)
		}
		return s
	case 2: // libpq's COPY in the extended protocol
		s := []ptStep{ptParse("", "COPY pt_copy FROM STDIN"), ptBind("", ""), ptExecute("", 0), sync, ptCopyData(rng)}
		if rng.IntN(2) == 0 {
			return append(s, done, sync)
		}
		return append(s, ptFrame("f", &pgproto3.CopyFail{Message: "pt abort"}), sync)
	case 3: // a whole extended batch
		stmt := pick(rng, []string{"", "pt_s1"})
		sql := pick(rng, ptParses)
		var params []string
		if sql == "SELECT $1::int" {
			params = []string{"7"}
		}
		return []ptStep{ptParse(stmt, sql), ptBind("", stmt, params...),
			ptFrame("D[P ]", &pgproto3.Describe{ObjectType: 'P'}), ptExecute("", pick(rng, []uint32{0, 1})), sync}
	case 4: // the attack
		return []ptStep{ptQuery(pick(rng, []string{"SELECT 1", "RESET ROLE", "DISCARD ALL", "SELECT pg_sleep(0.01)"})),
			ptCopyData(rng), sync, done}
	case 5: // a transaction
		s := []ptStep{ptQuery("BEGIN")}
		for range 1 + rng.IntN(3) {
			s = append(s, ptRandomFrame(rng))
		}
		return append(s, ptQuery(pick(rng, []string{"COMMIT", "ROLLBACK"})))
	default: // a reset, then a read of the identity
		return []ptStep{ptQuery(pick(rng, []string{"DISCARD ALL", "RESET ALL", "RESET ROLE", "SET ROLE admin", "RESET jwt.claims.sub"})),
			ptQuery("SELECT current_user, current_setting('jwt.claims.sub', true)")}
	}
}

// genPropertyCase draws a case: 1 to 30 frames, reads between some of
// them, pipelined or not, and an ending.
func genPropertyCase(rng *rand.Rand) ptCase {
	var c ptCase
	n := 1 + rng.IntN(30)
	if rng.IntN(2) == 0 {
		c.steps = append(c.steps, ptQuery("CREATE TEMP TABLE IF NOT EXISTS pt_copy (v text)"))
	}
	for c.frames() < n {
		var add []ptStep
		if rng.IntN(100) < 15 {
			add = ptSnippet(rng)
		} else {
			add = []ptStep{ptRandomFrame(rng)}
		}
		for _, s := range add {
			s.hold = rng.IntN(100) < 40
			s.split = rng.IntN(100) < 4
			c.steps = append(c.steps, s)
			if rng.IntN(100) < 15 {
				c.steps = append(c.steps, ptRead(pick(rng, []time.Duration{2 * time.Millisecond, 5 * time.Millisecond, 15 * time.Millisecond})))
			}
		}
	}
	if rng.IntN(100) < 8 {
		c.expire = time.Duration(5+rng.IntN(100)) * time.Millisecond
	}
	switch r := rng.IntN(100); {
	case r < 40:
		c.end = endClean
	case r < 60:
		c.end = endTerminate
	case r < 72:
		c.end = endClose
	case r < 82:
		c.end = endReset
	case r < 91:
		c.end = endPartial
	default:
		c.end = endIdle
	}
	return c
}

// ptClient speaks the protocol by hand and never blocks past its
// deadlines.
type ptClient struct {
	conn      *net.TCPConn
	in        []byte
	ended     bool   // the proxy closed the connection or sent FATAL
	fatalCode string // the SQLSTATE of the FATAL
	started   time.Time
}

type ptMsg struct {
	typ  byte
	body []byte
}

func ptStartup(addr, sub, token string) (*ptClient, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := &ptClient{conn: conn.(*net.TCPConn)}
	fail := func(err error) (*ptClient, error) {
		conn.Close()
		return nil, err
	}
	if err := c.write(startupPacket(3<<16, "user", sub, "database", demo.Database)); err != nil {
		return fail(err)
	}
	msgs := c.read(5*time.Second, 5*time.Second, func(m ptMsg) bool { return m.typ == 'R' || m.typ == 'E' })
	c.started = time.Now()
	if len(msgs) == 0 || msgs[len(msgs)-1].typ != 'R' {
		return fail(fmt.Errorf("no password request: %s", ptDescribe(msgs)))
	}
	pw, _ := (&pgproto3.PasswordMessage{Password: token}).Encode(nil)
	if err := c.write(pw); err != nil {
		return fail(err)
	}
	msgs = c.read(10*time.Second, 10*time.Second, func(m ptMsg) bool { return m.typ == 'Z' || m.typ == 'E' })
	if len(msgs) == 0 || msgs[len(msgs)-1].typ != 'Z' {
		return fail(fmt.Errorf("startup: %s", ptDescribe(msgs)))
	}
	return c, nil
}

// backendPID asks for the upstream backend's pid.
func (c *ptClient) backendPID() (int, error) {
	q, _ := (&pgproto3.Query{String: "SELECT pg_backend_pid()"}).Encode(nil)
	if err := c.write(q); err != nil {
		return 0, err
	}
	msgs := c.read(5*time.Second, 5*time.Second, func(m ptMsg) bool { return m.typ == 'Z' })
	for _, m := range msgs {
		if m.typ == 'D' && len(m.body) > 6 {
			return strconv.Atoi(string(m.body[6:]))
		}
	}
	return 0, fmt.Errorf("no pid in %s", ptDescribe(msgs))
}

func (c *ptClient) write(b []byte) error {
	_ = c.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, err := c.conn.Write(b)
	if err != nil {
		c.ended = true
	}
	return err
}

// read returns the whole messages that arrive until none has come for
// quiet, max has passed, stop accepts one, or the connection ends.
func (c *ptClient) read(quiet, max time.Duration, stop func(ptMsg) bool) []ptMsg {
	var msgs []ptMsg
	deadline := time.Now().Add(max)
	buf := make([]byte, 32<<10)
	for !c.ended {
		d := time.Now().Add(quiet)
		if d.After(deadline) {
			d = deadline
		}
		_ = c.conn.SetReadDeadline(d)
		n, err := c.conn.Read(buf)
		c.in = append(c.in, buf[:n]...)
		for len(c.in) >= 5 {
			size := int(binary.BigEndian.Uint32(c.in[1:5]))
			if size < 4 || size > 64<<20 {
				c.ended = true
				return msgs
			}
			if len(c.in) < 1+size {
				break
			}
			m := ptMsg{typ: c.in[0], body: append([]byte(nil), c.in[5:1+size]...)}
			c.in = c.in[1+size:]
			msgs = append(msgs, m)
			if m.typ == 'E' {
				if sev, code := ptSeverity(m.body); sev == "FATAL" {
					c.ended, c.fatalCode = true, code
				}
			}
			if stop != nil && stop(m) {
				return msgs
			}
		}
		if err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				c.ended = true
			}
			return msgs
		}
		if time.Now().After(deadline) {
			return msgs
		}
	}
	return msgs
}

// play sends the case's frames and leaves as it says.
func (c *ptClient) play(cs ptCase) {
	var pending []byte
	flush := func() {
		if len(pending) > 0 && !c.ended {
			_ = c.write(pending)
		}
		pending = pending[:0]
	}
	for _, s := range cs.steps {
		if c.ended {
			break
		}
		if s.raw == nil {
			flush()
			c.read(s.read, 250*time.Millisecond, nil)
			continue
		}
		if s.split {
			half := len(s.raw) / 2
			pending = append(pending, s.raw[:half]...)
			flush()
			time.Sleep(time.Millisecond)
			pending = append(pending, s.raw[half:]...)
		} else {
			pending = append(pending, s.raw...)
		}
		if !s.hold {
			flush()
		}
	}
	flush()
	if cs.expire > 0 && !c.ended {
		// Read while the token expires and the proxy ends the session.
		if wait := time.Until(c.started.Add(cs.expire + 100*time.Millisecond)); wait > 0 {
			c.read(wait, wait, nil)
		}
	}
	terminate := []byte{'X', 0, 0, 0, 4}
	switch cs.end {
	case endClean:
		sync, _ := (&pgproto3.Sync{}).Encode(nil)
		if c.write(sync) == nil {
			c.read(20*time.Millisecond, time.Second, nil)
		}
		_ = c.write(terminate)
	case endTerminate:
		_ = c.write(terminate)
	case endClose:
	case endReset:
		_ = c.conn.SetLinger(0)
	case endPartial:
		q, _ := (&pgproto3.Query{String: "SELECT 'half a query that never ends'"}).Encode(nil)
		_ = c.write(append(q[:len(q)/2:len(q)/2], terminate...))
	case endIdle:
		c.read(20*time.Millisecond, 20*time.Millisecond, nil)
	}
	c.conn.Close()
}

func ptSeverity(body []byte) (severity, code string) {
	var e pgproto3.ErrorResponse
	if e.Decode(body) != nil {
		return "", ""
	}
	return e.Severity, e.Code
}

// ptDescribe renders messages for an error.
func ptDescribe(msgs []ptMsg) string {
	var parts []string
	for _, m := range msgs {
		s := string(m.typ)
		if m.typ == 'E' {
			var e pgproto3.ErrorResponse
			if e.Decode(m.body) == nil {
				s = fmt.Sprintf("E(%s %s: %s)", e.Severity, e.Code, e.Message)
			}
		}
		parts = append(parts, s)
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, " ")
}
