package session

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// Pool keeps upstream connections between client sessions. A connection is
// returned only after a reset that is proved: ROLLBACK if needed, DISCARD
// ALL (role, settings, prepared statements, temporary tables, advisory
// locks, LISTEN), then a query showing the role is the login role and no
// claims are left. Connections are kept per database and startup parameters,
// since those are fixed when a connection is opened.
type Pool struct {
	dialer *Dialer
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
	// ClaimsSetting is the setting the reset proof checks is empty.
	ClaimsSetting string
}

type pooled struct {
	up       *Upstream
	key      string
	born     time.Time
	released time.Time
}

// ErrPoolExhausted is returned when no upstream connection frees up in time.
var ErrPoolExhausted = errors.New("all upstream connections are in use")

// NewPool returns a pool opening connections with d.
func NewPool(d *Dialer, cfg PoolConfig) *Pool {
	p := &Pool{dialer: d, cfg: cfg, idle: map[string][]*pooled{}, returned: make(chan struct{}, 1), stop: make(chan struct{})}
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

// Dialer returns the dialer the pool opens connections with.
func (p *Pool) Dialer() *Dialer { return p.dialer }

// Get returns a connection to database with the grant installed: an idle one
// that passes the install (its health check), or a new one. At MaxConns it
// waits for a connection to come back or to close, up to WaitTimeout.
func (p *Pool) Get(ctx context.Context, database string, params map[string]string, g *Grant) (*Upstream, error) {
	if database == "" {
		database = p.dialer.Database()
	}
	key := poolKey(database, params)
	var timeout <-chan time.Time
	for {
		if pc := p.takeIdle(key); pc != nil {
			if err := pc.up.install(ctx, g, p.dialer.Signer); err != nil {
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
// session ended between statements, with every frame read; only then is the
// connection reset and kept, otherwise it is closed.
func (p *Pool) Release(ctx context.Context, up *Upstream, clean bool) {
	if !clean || p.cfg.Size <= 0 || (p.cfg.MaxLifetime > 0 && time.Since(up.born) > p.cfg.MaxLifetime) {
		p.discard(up)
		return
	}
	if err := up.reset(ctx, p.cfg.ClaimsSetting); err != nil {
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

// Stats reports the open and idle connections.
func (p *Pool) Stats() (open, idle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.idle {
		idle += len(l)
	}
	return p.open, idle
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

func poolKey(database string, params map[string]string) string {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString(database)
	for _, k := range keys {
		b.WriteByte(0)
		b.WriteString(k)
		b.WriteByte(0)
		b.WriteString(params[k])
	}
	return b.String()
}

// install sets the grant on a pooled connection over the raw protocol (it is
// also the health check of a connection taken from the pool).
func (u *Upstream) install(ctx context.Context, g *Grant, signer *Signer) error {
	frames, err := u.InstallFrames(g, signer)
	if err != nil {
		return err
	}
	var role string
	err = u.roundTrip(ctx, frames, func(m pgproto3.BackendMessage) {
		if d, ok := m.(*pgproto3.DataRow); ok && len(d.Values) == 2 {
			role = string(d.Values[1])
		}
	})
	if err != nil {
		return err
	}
	if role != g.Role {
		return fmt.Errorf("role switch to %q did not take effect", g.Role)
	}
	return nil
}

// resetProofSQL shows that a reset connection carries nothing of the last
// session's identity: it runs as the login role with no claims and no
// signature, and holds no prepared statement or LISTEN. (Advisory locks go
// with DISCARD ALL too; the pool tests check them, but pg_locks is too dear
// to read on every release.)
const resetProofSQL = `SELECT current_user = session_user
	AND coalesce(current_setting($1, true), '') = ''
	AND coalesce(current_setting('` + SignatureSetting + `', true), '') = ''
	AND NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements)
	AND NOT EXISTS (SELECT FROM pg_catalog.pg_listening_channels())`

// reset undoes a session: ROLLBACK when a transaction is open, DISCARD ALL,
// and the proof query, which checks claimsSetting (a bind parameter) too.
func (u *Upstream) reset(ctx context.Context, claimsSetting string) error {
	if claimsSetting == "" {
		claimsSetting = "request.jwt.claims"
	}
	var q []byte
	if u.TxStatus != 'I' {
		q, _ = (&pgproto3.Query{String: "ROLLBACK"}).Encode(q)
	}
	q, _ = (&pgproto3.Query{String: "DISCARD ALL"}).Encode(q)
	for _, m := range []pgproto3.FrontendMessage{
		&pgproto3.Parse{Query: resetProofSQL},
		&pgproto3.Bind{Parameters: [][]byte{[]byte(claimsSetting)}},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
	} {
		q, _ = m.Encode(q)
	}
	proved := false
	err := u.roundTrip(ctx, q, func(m pgproto3.BackendMessage) {
		if d, ok := m.(*pgproto3.DataRow); ok && len(d.Values) == 1 {
			proved = string(d.Values[0]) == "t"
		}
	})
	if err != nil {
		return err
	}
	if !proved {
		return errors.New("reset did not clear the session")
	}
	return nil
}

// roundTrip writes frames and reads the answers up to the ReadyForQuery of
// the last unit, passing each message to see. ParameterStatus updates
// u.Params and the last ReadyForQuery u.TxStatus. Any ErrorResponse fails it.
func (u *Upstream) roundTrip(ctx context.Context, frames []byte, see func(pgproto3.BackendMessage)) error {
	deadline := time.Now().Add(10 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = u.Conn.SetDeadline(deadline)
	defer u.Conn.SetDeadline(time.Time{})
	units := countUnits(frames)
	if _, err := u.Conn.Write(frames); err != nil {
		return err
	}
	var firstErr error
	for units > 0 {
		typ, body, err := u.Reader.ReadMessage()
		if err != nil {
			return err
		}
		switch typ {
		case 'Z':
			units--
			if len(body) == 1 {
				u.TxStatus = body[0]
			}
		case 'E':
			var e pgproto3.ErrorResponse
			if firstErr == nil && e.Decode(body) == nil {
				firstErr = fmt.Errorf("%s (SQLSTATE %s)", e.Message, e.Code)
			}
		case 'S':
			var ps pgproto3.ParameterStatus
			if ps.Decode(body) == nil {
				u.Params[ps.Name] = ps.Value
			}
		case 'D':
			var d pgproto3.DataRow
			if d.Decode(body) == nil {
				see(&d)
			}
		}
	}
	return firstErr
}

// countUnits counts the ReadyForQuery messages a run of whole frames asks for.
func countUnits(frames []byte) int64 {
	var n int64
	for len(frames) > 0 {
		typ, size, ok, err := wire.Header(frames)
		if !ok || err != nil || size > len(frames) {
			break
		}
		n += wire.Units(typ)
		frames = frames[size:]
	}
	return n
}
