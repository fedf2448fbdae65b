package session

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Pool hands out upstream connections with a session's grant installed,
// and keeps them between client sessions. A connection is kept only after a
// reset that is proved: ROLLBACK if needed, DISCARD ALL (role, settings,
// prepared statements, temporary tables, advisory locks, LISTEN), then a
// query showing the role is the login role and no claims are left.
// Connections are kept per database and startup parameters, since those are
// fixed when a connection is opened. The pool holds the policy its sessions
// are set up by: the proxy asks it for a grant, and its reset checks the
// claims setting.
type Pool struct {
	dialer *Dialer
	policy Policy
	cfg    PoolConfig

	mu     sync.Mutex
	idle   map[string][]*pooled // by key, most recently used last
	open   int                  // connections open, idle or in use
	closed bool
	slots  chan struct{} // one per allowed connection; nil: unlimited
	// returned wakes a client waiting at MaxConns when a connection comes
	// back to the idle list.
	returned chan struct{}
	stop     chan struct{}
}

// PoolConfig tunes a Pool.
type PoolConfig struct {
	// Size is the most idle connections kept per database; 0 turns pooling
	// off (every session opens and closes its own connection).
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

type pooled struct {
	up       *Upstream
	key      string
	born     time.Time
	released time.Time
}

// ErrPoolExhausted is returned when no upstream connection frees up in time.
var ErrPoolExhausted = errors.New("all upstream connections are in use")

// NewPool returns a pool opening connections with d for sessions set up by
// policy.
func NewPool(d *Dialer, policy Policy, cfg PoolConfig) *Pool {
	p := &Pool{dialer: d, policy: policy, cfg: cfg, idle: map[string][]*pooled{}, returned: make(chan struct{}, 1), stop: make(chan struct{})}
	if cfg.MaxConns > 0 {
		p.slots = make(chan struct{}, cfg.MaxConns)
	}
	if cfg.WaitTimeout <= 0 {
		p.cfg.WaitTimeout = 5 * time.Second
	}
	if cfg.Size > 0 && cfg.IdleTimeout > 0 {
		go p.janitor()
	}
	return p
}

// Policy is how the pool's sessions are set up.
func (p *Pool) Policy() Policy { return p.policy }

// Database is the database of the upstream DSN, a client's default.
func (p *Pool) Database() string { return p.dialer.Database() }

// Ping proves that the database answers the service login.
func (p *Pool) Ping(ctx context.Context) error {
	conn, err := p.dialer.Connect(ctx)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// Get returns a connection to database with the grant installed: an idle one
// that passes the install (its health check), or a new one. At MaxConns it
// waits for a connection to come back or to close, up to WaitTimeout.
func (p *Pool) Get(ctx context.Context, database string, params map[string]string, g *Grant) (*Upstream, error) {
	key := poolKey(g.Role, database, params)
	var timeout <-chan time.Time
	for {
		if pc := p.takeIdle(key); pc != nil {
			if err := pc.up.install(ctx, g); err != nil {
				p.discard(pc.up) // broken, or closed by the server: try the next
				continue
			}
			pc.up.key, pc.up.born = key, pc.born
			return pc.up, nil
		}
		if p.trySlot() || (p.closeOneIdle() && p.trySlot()) {
			return p.openNew(ctx, key, database, params, g)
		}
		if timeout == nil {
			t := time.NewTimer(p.cfg.WaitTimeout)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case p.slots <- struct{}{}:
			return p.openNew(ctx, key, database, params, g)
		case <-p.returned:
		case <-timeout:
			return nil, fmt.Errorf("%w (--max-upstream-conns %d) after waiting %s", ErrPoolExhausted, p.cfg.MaxConns, p.cfg.WaitTimeout)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// openNew opens a new connection in a slot already taken.
func (p *Pool) openNew(ctx context.Context, key, database string, params map[string]string, g *Grant) (*Upstream, error) {
	up, err := p.dialer.Open(ctx, database, params, g)
	if err != nil {
		p.releaseSlot()
		return nil, err
	}
	p.mu.Lock()
	p.open++
	p.mu.Unlock()
	up.key, up.born = key, time.Now()
	return up, nil
}

// Release hands a connection back after its session. clean tells that the
// session ended between statements, with every frame read and nothing owed;
// only then is the connection reset and kept, otherwise it is closed.
// txStatus is the transaction status the server last reported.
func (p *Pool) Release(ctx context.Context, up *Upstream, clean bool, txStatus byte) {
	if !clean || p.cfg.Size <= 0 || (p.cfg.MaxLifetime > 0 && time.Since(up.born) > p.cfg.MaxLifetime) {
		p.discard(up)
		return
	}
	up.txStatus = txStatus
	if err := up.reset(ctx, p.policy.ClaimsSetting); err != nil {
		p.discard(up)
		return
	}
	p.mu.Lock()
	if p.closed || len(p.idle[up.key]) >= p.cfg.Size {
		p.mu.Unlock()
		p.discard(up)
		return
	}
	p.idle[up.key] = append(p.idle[up.key], &pooled{up: up, key: up.key, born: up.born, released: time.Now()})
	p.mu.Unlock()
	select { // wake a client waiting at MaxConns
	case p.returned <- struct{}{}:
	default:
	}
}

// Stats reports the connections open (idle or in use) and idle.
func (p *Pool) Stats() (open, idle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.idle {
		idle += len(l)
	}
	return p.open, idle
}

// Close closes the idle connections; connections in use close when released.
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
	p.mu.Unlock()
	for _, pc := range all {
		p.discard(pc.up)
	}
}

func (p *Pool) takeIdle(key string) *pooled {
	p.mu.Lock()
	defer p.mu.Unlock()
	list := p.idle[key]
	if len(list) == 0 {
		return nil
	}
	pc := list[len(list)-1]
	p.idle[key] = list[:len(list)-1]
	return pc
}

func (p *Pool) discard(up *Upstream) {
	_ = up.Close()
	p.mu.Lock()
	p.open--
	p.mu.Unlock()
	p.releaseSlot()
}

// trySlot takes a connection slot if one is free (always, without MaxConns).
func (p *Pool) trySlot() bool {
	if p.slots == nil {
		return true
	}
	select {
	case p.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (p *Pool) releaseSlot() {
	if p.slots != nil {
		select {
		case <-p.slots:
		default:
		}
	}
}

// closeOneIdle closes the least recently released idle connection.
func (p *Pool) closeOneIdle() bool {
	p.mu.Lock()
	var oldest *pooled
	for _, list := range p.idle {
		if len(list) > 0 && (oldest == nil || list[0].released.Before(oldest.released)) {
			oldest = list[0]
		}
	}
	if oldest != nil {
		p.idle[oldest.key] = slices.Delete(p.idle[oldest.key], 0, 1)
	}
	p.mu.Unlock()
	if oldest == nil {
		return false
	}
	p.discard(oldest.up)
	return true
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
