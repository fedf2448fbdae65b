package session

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Pool hands out upstream connections and keeps them between client
// sessions, or, in transaction mode, between transactions.
//
// Connections are kept per role, database and startup parameters (the pool
// key), since those are fixed when a connection logs in. A connection kept
// after a session that may have left state behind is first reset and the
// reset proved: ROLLBACK if needed, DISCARD ALL (role, settings, prepared
// statements, temporary tables, advisory locks, LISTEN), then a query
// showing the role is the login role and no claims are left. One that
// served a transaction (or a session) that left nothing behind is kept as it
// is, its grant installed: the next client of the same identity needs no
// install at all, and another one's install overwrites it.
//
// Clients that find every connection in use wait in the order they came, up
// to WaitTimeout. The pool holds the policy its sessions are set up by: the
// proxy asks it for a grant, and its reset checks the claims setting.
type Pool struct {
	dialer *Dialer
	policy Policy
	cfg    PoolConfig

	mu   sync.Mutex
	idle map[string][]*pooled // by key, most recently used last
	// openByRole counts the open connections by role and database
	// (roleDatabase), for the metrics.
	openByRole map[string]int
	open       int       // connections open or being opened, idle or in use
	waiters    []*waiter // clients waiting for a connection, oldest first
	closed     bool
	stop       chan struct{}
	stats      poolCounters
}

// PoolConfig tunes a Pool.
type PoolConfig struct {
	// Size is the most idle connections kept per key; 0 turns pooling off
	// (every session opens and closes its own connection).
	Size int
	// MaxConns bounds the upstream connections open at once; 0: no bound.
	MaxConns int
	// WaitTimeout bounds how long a client waits for a connection when
	// MaxConns are in use.
	WaitTimeout time.Duration
	// IdleTimeout closes connections idle for longer.
	IdleTimeout time.Duration
	// MaxLifetime closes connections older than this when they are released.
	MaxLifetime time.Duration
}

// Target is what a session asks the pool for: a connection to Database,
// logged in with the client's startup Params, for Grant's identity. A
// session makes one at login and asks with it for every connection it
// holds, so that its pool key is built once: its fields must not change
// after NewTarget.
type Target struct {
	Database string
	Params   map[string]string
	Grant    *Grant
	key      string
}

// NewTarget returns the Target of a session.
func NewTarget(database string, params map[string]string, g *Grant) *Target {
	return &Target{Database: database, Params: params, Grant: g, key: poolKey(g.Role, database, params)}
}

type pooled struct {
	up       *Upstream
	released time.Time
}

// waiter is a client waiting for a connection of key. It is handed either a
// connection of its key, or the right to open one (a slot).
type waiter struct {
	key  string
	got  chan handoff // buffered: the hand-over never blocks
	done bool         // handed something, or gave up (under Pool.mu)
}

type handoff struct {
	up   *Upstream // an idle connection of the waiter's key
	slot bool      // or: a connection may be opened, counted in open already
}

// poolCounters are totals since the pool started, for metrics.
type poolCounters struct {
	waits                  int64
	waited                 time.Duration
	identityHits, installs int64
	resets, reusedWithout  int64
	opened, discarded      int64
	timeouts               int64
}

// ErrPoolExhausted is returned when no upstream connection frees up in time.
var ErrPoolExhausted = errors.New("all upstream connections are in use")

// NewPool returns a pool opening connections with d for sessions set up by
// policy.
func NewPool(d *Dialer, policy Policy, cfg PoolConfig) *Pool {
	p := &Pool{dialer: d, policy: policy, cfg: cfg, idle: map[string][]*pooled{}, openByRole: map[string]int{}, stop: make(chan struct{})}
	if cfg.WaitTimeout <= 0 {
		p.cfg.WaitTimeout = 5 * time.Second
	}
	if cfg.Size > 0 && cfg.IdleTimeout > 0 {
		go p.janitor()
	}
	return p
}

// SetLimits changes, for the connections handed out from now on, how many
// stay idle, how many may be open and how long a client waits (a reload of
// the configuration). Connections beyond a lowered bound close as they come
// back.
func (p *Pool) SetLimits(size, maxConns int, wait time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cfg.Size, p.cfg.MaxConns = size, maxConns
	if wait > 0 {
		p.cfg.WaitTimeout = wait
	}
}

// Policy is how the pool's sessions are set up.
func (p *Pool) Policy() Policy {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.policy
}

// SetPolicy changes how sessions from now on get their role (a reload of
// the configuration: --role, --role-map, --role-claim, --anonymous-role).
// Sessions running keep theirs; the claim settings must not change (the
// guard protects them by name), which the caller checks.
func (p *Pool) SetPolicy(policy Policy) {
	p.mu.Lock()
	p.policy = policy
	p.mu.Unlock()
}

// Database is the database of the upstream DSN, a client's default.
func (p *Pool) Database() string { return p.dialer.Database() }

// Ping proves that the pool can serve: an idle pooled connection that
// answers a round trip proves the database answers, with no new login (a
// full database refuses those while pooled sessions work); without one, the
// service login must succeed, or the database be full (53300) while the
// pool holds connections, whose clients it serves in turn.
func (p *Pool) Ping(ctx context.Context) error {
	p.mu.Lock()
	var pc *pooled
	for k, list := range p.idle {
		if n := len(list); n > 0 {
			pc = list[n-1]
			p.idle[k] = list[:n-1]
			break
		}
	}
	open := p.open
	p.mu.Unlock()
	if pc != nil {
		b := newBatch('I')
		b.exec("SELECT 1", nil, nil, nil, func([][]byte) error { return nil })
		b.sync()
		if err := pc.up.roundTrip(ctx, b); err != nil {
			p.discard(pc.up)
		} else {
			p.putBack(pc.up, false)
			return nil
		}
	}
	conn, err := p.dialer.Connect(ctx)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "53300" && open > 0 {
			return nil
		}
		return err
	}
	return conn.Close(ctx)
}

// Get returns a connection for t with its grant installed, for a session:
// an idle one that passes the install (its health check), or a new one.
func (p *Pool) Get(ctx context.Context, t *Target) (*Upstream, error) {
	for {
		up, installed, err := p.Acquire(ctx, t)
		if err != nil || (installed && len(up.Drift()) == 0) {
			return up, err
		}
		if err := up.install(ctx, t.Grant); err != nil {
			p.discard(up) // broken, or closed by the server: try the next
			continue
		}
		return up, nil
	}
}

// Acquire returns a connection for t: preferably an idle one whose
// installed grant is t's identity already (installed reports it), else
// another idle one of its key, whose grant the caller must install
// (Upstream.Switch, sent ahead of the client's first message), else a new
// one, opened with t's grant installed. At MaxConns the caller waits its
// turn, up to WaitTimeout.
func (p *Pool) Acquire(ctx context.Context, t *Target) (up *Upstream, installed bool, err error) {
	key, g := t.key, t.Grant
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, false, errors.New("the upstream pool is closed")
	}
	if pc := p.takeIdleLocked(key, g); pc != nil {
		same := p.countInstallLocked(pc.up, g)
		p.mu.Unlock()
		return pc.up, same, nil
	}
	if p.cfg.MaxConns <= 0 || p.open < p.cfg.MaxConns {
		p.open++
		p.mu.Unlock()
		return p.openNew(ctx, t)
	}
	if victim := p.oldestIdleLocked(); victim != nil {
		// Every slot is taken, some by connections idle under another
		// key: one of them makes room.
		p.mu.Unlock()
		p.closeUp(victim.up)
		return p.openNew(ctx, t)
	}
	w := &waiter{key: key, got: make(chan handoff, 1)}
	p.waiters = append(p.waiters, w)
	p.stats.waits++
	cfg := p.cfg
	p.mu.Unlock()

	began := time.Now()
	timer := time.NewTimer(cfg.WaitTimeout)
	defer timer.Stop()
	var h handoff
	received := false
	select {
	case h = <-w.got:
		received = true
	case <-timer.C:
	case <-ctx.Done():
	}
	p.mu.Lock()
	p.stats.waited += time.Since(began)
	if !w.done {
		// Gave up: out of the queue.
		w.done = true
		p.waiters = slices.DeleteFunc(p.waiters, func(x *waiter) bool { return x == w })
		if ctx.Err() == nil {
			p.stats.timeouts++
		}
		p.mu.Unlock()
		if ctx.Err() != nil {
			return nil, false, ctx.Err()
		}
		return nil, false, fmt.Errorf("%w (--max-upstream-conns %d) after waiting %s", ErrPoolExhausted, cfg.MaxConns, cfg.WaitTimeout)
	}
	p.mu.Unlock()
	if !received {
		h = <-w.got // handed over just as the wait ended
	}
	switch {
	case h.up != nil:
		return h.up, p.installed(h.up, g), nil
	case h.slot:
		return p.openNew(ctx, t)
	}
	return nil, false, errors.New("the upstream pool is closed")
}

// installed reports whether up's installed grant is g's identity, and
// counts identity hits and installs.
func (p *Pool) installed(up *Upstream, g *Grant) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.countInstallLocked(up, g)
}

// countInstallLocked is installed with p.mu held.
func (p *Pool) countInstallLocked(up *Upstream, g *Grant) bool {
	same := up.grant.SameIdentity(g)
	if same {
		p.stats.identityHits++
	} else {
		p.stats.installs++
	}
	return same
}

// openNew opens a new connection in a slot already counted in open.
func (p *Pool) openNew(ctx context.Context, t *Target) (*Upstream, bool, error) {
	up, err := p.dialer.Open(ctx, t.Database, t.Params, t.Grant)
	if err != nil {
		p.freeSlot()
		return nil, false, err
	}
	up.key, up.born = t.key, time.Now()
	p.mu.Lock()
	p.stats.opened++
	p.openByRole[roleDatabase(t.key)]++
	p.mu.Unlock()
	return up, true, nil
}

// Return hands back, in transaction mode, a connection whose transaction
// left nothing behind: idle, nothing owed, no session state. It keeps its
// grant, so that the next transaction of the same identity needs no install.
func (p *Pool) Return(up *Upstream) {
	p.putBack(up, true)
}

// Release hands a connection back after its session. clean tells that the
// session ended between statements, with every frame read and nothing owed;
// only then is the connection kept, otherwise it is closed. stateful tells
// that the session may have left state behind (settings, prepared
// statements, temporary objects, ...): the connection is then reset first.
// txStatus is the transaction status the server last reported.
func (p *Pool) Release(ctx context.Context, up *Upstream, clean, stateful bool, txStatus byte) {
	p.mu.Lock()
	cfg := p.cfg
	p.mu.Unlock()
	if !clean || cfg.Size <= 0 || (cfg.MaxLifetime > 0 && time.Since(up.born) > cfg.MaxLifetime) {
		p.discard(up)
		return
	}
	up.txStatus = txStatus
	if stateful || txStatus != 'I' {
		if err := up.reset(ctx, p.Policy().ClaimsSetting); err != nil {
			p.discard(up)
			return
		}
		p.mu.Lock()
		p.stats.resets++
		p.mu.Unlock()
	}
	p.putBack(up, !stateful && txStatus == 'I')
}

// putBack hands up to the first client waiting for its key, or keeps it
// idle; a client waiting for another key gets its slot instead. reused
// counts it as reused without a reset.
func (p *Pool) putBack(up *Upstream, reused bool) {
	// A session that ended may have set deadlines to stop its reader.
	_ = up.conn.SetDeadline(time.Time{})
	p.mu.Lock()
	if reused {
		p.stats.reusedWithout++
	}
	if p.closed || (p.cfg.MaxLifetime > 0 && time.Since(up.born) > p.cfg.MaxLifetime) {
		p.mu.Unlock()
		p.discard(up)
		return
	}
	for i, w := range p.waiters {
		if w.key == up.key {
			p.waiters = slices.Delete(p.waiters, i, i+1)
			w.done = true
			w.got <- handoff{up: up}
			p.mu.Unlock()
			return
		}
	}
	if len(p.waiters) > 0 || len(p.idle[up.key]) >= p.cfg.Size {
		// Waiters for other keys come first: this connection makes room.
		p.mu.Unlock()
		p.discard(up)
		return
	}
	p.idle[up.key] = append(p.idle[up.key], &pooled{up: up, released: time.Now()})
	p.mu.Unlock()
}

// PoolStats is a snapshot of the pool.
type PoolStats struct {
	Open, Idle, Waiting int
	// ByKey are the connections by role and database.
	ByKey []KeyStats
	// Totals since the pool started.
	Waits, Timeouts            int64
	Waited                     time.Duration
	IdentityHits, Installs     int64
	Resets, ReusedWithoutReset int64
	Opened, Discarded          int64
}

// KeyStats are one role and database's connections.
type KeyStats struct {
	Role, Database string
	Open, Idle     int
}

// Stats reports the connections open (idle or in use) and idle.
func (p *Pool) Stats() (open, idle int) {
	s := p.Snapshot()
	return s.Open, s.Idle
}

// Snapshot reports the pool's state and totals.
func (p *Pool) Snapshot() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := PoolStats{Open: p.open, Waiting: len(p.waiters),
		Waits: p.stats.waits, Timeouts: p.stats.timeouts, Waited: p.stats.waited,
		IdentityHits: p.stats.identityHits, Installs: p.stats.installs,
		Resets: p.stats.resets, ReusedWithoutReset: p.stats.reusedWithout,
		Opened: p.stats.opened, Discarded: p.stats.discarded}
	byRole := map[string]*KeyStats{}
	for rd, n := range p.openByRole {
		role, db := splitKey(rd)
		byRole[rd] = &KeyStats{Role: role, Database: db, Open: n}
	}
	for k, list := range p.idle {
		s.Idle += len(list)
		if ks := byRole[roleDatabase(k)]; ks != nil {
			ks.Idle += len(list)
		}
	}
	for _, ks := range byRole {
		s.ByKey = append(s.ByKey, *ks)
	}
	slices.SortFunc(s.ByKey, func(a, b KeyStats) int {
		return strings.Compare(a.Role+"\x00"+a.Database, b.Role+"\x00"+b.Database)
	})
	return s
}

// Close closes the idle connections; connections in use close when
// released. Waiting clients give up.
func (p *Pool) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	close(p.stop)
	var all []*pooled
	for k, list := range p.idle {
		all = append(all, list...)
		delete(p.idle, k)
	}
	for _, w := range p.waiters {
		w.done = true
		w.got <- handoff{}
	}
	p.waiters = nil
	p.mu.Unlock()
	for _, pc := range all {
		p.discard(pc.up)
	}
}

// takeIdleLocked takes an idle connection of key: the most recently used one
// whose grant is g's identity, else the most recently used one.
func (p *Pool) takeIdleLocked(key string, g *Grant) *pooled {
	list := p.idle[key]
	if len(list) == 0 {
		return nil
	}
	i := len(list) - 1
	for j := len(list) - 1; j >= 0; j-- {
		if list[j].up.grant.SameIdentity(g) {
			i = j
			break
		}
	}
	pc := list[i]
	p.idle[key] = slices.Delete(list, i, i+1)
	return pc
}

// oldestIdleLocked takes the least recently released idle connection.
func (p *Pool) oldestIdleLocked() *pooled {
	var oldest *pooled
	var key string
	for k, list := range p.idle {
		if len(list) > 0 && (oldest == nil || list[0].released.Before(oldest.released)) {
			oldest, key = list[0], k
		}
	}
	if oldest != nil {
		p.idle[key] = slices.Delete(p.idle[key], 0, 1)
	}
	return oldest
}

// discard closes up and frees its slot.
func (p *Pool) discard(up *Upstream) {
	_ = up.Close()
	p.closed1(up)
	p.freeSlot()
}

// closeUp closes up, whose slot its caller takes over.
func (p *Pool) closeUp(up *Upstream) {
	_ = up.Close()
	p.closed1(up)
	p.mu.Lock()
	p.stats.discarded++
	p.mu.Unlock()
}

// closed1 counts a connection of the pool's closed.
func (p *Pool) closed1(up *Upstream) {
	if up.key == "" {
		return // not the pool's (NewUpstream)
	}
	p.mu.Lock()
	rd := roleDatabase(up.key)
	if p.openByRole[rd]--; p.openByRole[rd] <= 0 {
		delete(p.openByRole, rd)
	}
	p.mu.Unlock()
}

// roleDatabase is the role and database part of a pool key.
func roleDatabase(key string) string {
	role, database := splitKey(key)
	return role + "\x00" + database
}

// freeSlot gives a closed connection's slot to the first waiting client, or
// frees it.
func (p *Pool) freeSlot() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stats.discarded++
	if len(p.waiters) > 0 && !p.closed {
		w := p.waiters[0]
		p.waiters = p.waiters[1:]
		w.done = true
		w.got <- handoff{slot: true}
		return
	}
	p.open--
}

// janitor closes connections idle for longer than IdleTimeout.
func (p *Pool) janitor() {
	t := time.NewTicker(max(p.cfg.IdleTimeout/4, time.Second))
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		var expired []*pooled
		p.mu.Lock()
		for k, list := range p.idle {
			keep := list[:0]
			for _, pc := range list {
				if time.Since(pc.released) > p.cfg.IdleTimeout {
					expired = append(expired, pc)
				} else {
					keep = append(keep, pc)
				}
			}
			p.idle[k] = keep
		}
		p.mu.Unlock()
		for _, pc := range expired {
			p.discard(pc.up)
		}
	}
}

// poolKey is what connections are kept by: the role they serve (with
// per-role logins, each logs in as its role's own), the database and the
// startup parameters, all fixed at login.
func poolKey(role, database string, params map[string]string) string {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString(role)
	b.WriteByte(0)
	b.WriteString(database)
	for _, k := range keys {
		b.WriteByte(0)
		b.WriteString(k)
		b.WriteByte(0)
		b.WriteString(params[k])
	}
	return b.String()
}

// splitKey returns the role and database of a pool key.
func splitKey(key string) (role, database string) {
	role, rest, _ := strings.Cut(key, "\x00")
	database, _, _ = strings.Cut(rest, "\x00")
	return role, database
}
