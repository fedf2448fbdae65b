package session

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// Upstream is one upstream connection, taken over from pgconn so its frames
// can be relayed raw, with what the proxy knows of it. It may serve many
// client sessions in turn (the pool's). The relay reads and writes its
// socket; everything else about it changes only through its methods.
type Upstream struct {
	conn      net.Conn
	reader    *wire.Reader
	pid       uint32
	secretKey []byte
	// params are the server's ParameterStatus values, for the client.
	params map[string]string
	// txStatus is the transaction status the server last reported.
	txStatus byte
	// grant is the identity installed; signer signs its claims.
	grant  *Grant
	signer *Signer

	// prepared are the statements transaction-pooled clients prepared on
	// the connection, by client session (the owner) and name on the
	// server, so that those of sessions that ended are found without
	// looking at the others'; nPrepared counts them. preparedUnknown: the
	// record may lack some (a DEALLOCATE ALL the server did not run).
	// unnamedOwner is the client session whose unnamed statement the
	// connection holds (0: none known). Only the relay serving the
	// connection touches them: both its sides, under its lock of them, and
	// its sweep before it starts reading the connection.
	prepared        map[uint64]map[string]struct{}
	nPrepared       int
	preparedUnknown bool
	unnamedOwner    uint64
	swept           uint64

	// initial are the values of CarriedSettings the server reported at
	// login, which its startup parameters (the pool key) gave it.
	initial map[string]string
	// carried is CarriedSignature(params) when carriedOK.
	carried   string
	carriedOK bool

	key  string    // the pool key: database and startup parameters
	born time.Time // when the connection was opened
	// addr is the server's address, for cancel requests: the socket is
	// rebound while a session is relayed (proxy/relay_loop_linux.go).
	addr net.Addr
}

// CarriedSettings are the settings the server reports in ParameterStatus
// that a client may change (SET, set_config) and that carry no identity:
// a connection's values follow its startup parameters between sessions
// (Drift), and a transaction-pooled client's values follow it from
// connection to connection, so that they never pin (guard/state.go).
var CarriedSettings = []string{"application_name", "client_encoding", "DateStyle", "IntervalStyle",
	"TimeZone", "standard_conforming_strings", "default_transaction_read_only"}

// CarriedSignature encodes the values of CarriedSettings in values (a
// missing one as empty): two connections, or a client and a connection,
// with the same signature hold the same values, so that the relay compares
// one string per transaction instead of every setting.
func CarriedSignature(values map[string]string) string {
	var b []byte
	for _, name := range CarriedSettings {
		v := values[name]
		b = binary.AppendUvarint(b, uint64(len(v)))
		b = append(b, v...)
	}
	return string(b)
}

// CarriedSignature is the signature of the connection's values of
// CarriedSettings.
func (u *Upstream) CarriedSignature() string {
	if !u.carriedOK {
		u.carried, u.carriedOK = CarriedSignature(u.params), true
	}
	return u.carried
}

// Drift returns the carried settings whose values differ from those the
// connection had at login: what a session that was not reset left, which
// the next session from the pool must not see.
func (u *Upstream) Drift() []Setting {
	var out []Setting
	for _, name := range CarriedSettings {
		if v, ok := u.initial[name]; ok && u.params[name] != v {
			out = append(out, Setting{Name: name, Value: v})
		}
	}
	return out
}

// Conn is the connection's socket, for the relay.
func (u *Upstream) Conn() net.Conn { return u.conn }

// Reader reads the socket, holding what was read and not yet relayed.
func (u *Upstream) Reader() *wire.Reader { return u.reader }

// Rebind gives the connection a new socket for the same server connection
// (the relay's event loop takes sockets off the Go runtime and hands them
// back), with buffered as bytes already read from it.
func (u *Upstream) Rebind(c net.Conn, buffered []byte) {
	u.conn = c
	u.reader.ResetBuffered(c, buffered)
}

// Parameter returns a setting the server reported (ParameterStatus).
func (u *Upstream) Parameter(name string) string { return u.params[name] }

// InitialParameter returns the value of one of CarriedSettings the server
// reported at login: the value RESET ALL brings back.
func (u *Upstream) InitialParameter(name string) string { return u.initial[name] }

// SetParameter records a setting the server reported while the relay read
// the connection.
func (u *Upstream) SetParameter(name, value string) {
	u.params[name] = value
	u.carriedOK = false
}

// Greeting returns what a client reads once its session is ready:
// AuthenticationOk, the server's ParameterStatus messages, the proxy's own
// BackendKeyData (the server's never leaves the proxy) and ReadyForQuery.
func (u *Upstream) Greeting(pid uint32, secret []byte) []byte {
	out, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	for k, v := range u.params {
		out, _ = (&pgproto3.ParameterStatus{Name: k, Value: v}).Encode(out)
	}
	out, _ = (&pgproto3.BackendKeyData{ProcessID: pid, SecretKey: secret}).Encode(out)
	out, _ = (&pgproto3.ReadyForQuery{TxStatus: u.txStatus}).Encode(out)
	return out
}

// Reinstall returns the batch that installs the connection's grant again,
// with a fresh nonce, on the connection now in transaction status status:
// the relay sends it to re-establish the session after a client's reset,
// which reset the client's carried settings too (the server reports them).
func (u *Upstream) Reinstall(status byte) *Batch {
	return installBatch(u.grant, nil, nil, u.signer, u.pid, status)
}

// Switch returns the batch that installs g, an identity other than the
// connection's, on the idle connection: what transaction pooling sends ahead
// of a client's first message on a connection that last served another
// identity. extra are settings the client set that follow it from
// connection to connection (application_name, TimeZone, ...). The grant is
// recorded at once: a batch that fails ends the connection.
func (u *Upstream) Switch(g *Grant, extra []Setting) *Batch {
	b := installBatch(g, u.grant, extra, u.signer, u.pid, 'I')
	if !u.grant.SameIdentity(g) {
		u.unnamedOwner = 0 // closed by the batch
	}
	u.grant = g
	return b
}

// Prepared reports whether the connection holds owner's statement of that
// name on the server (transaction pooling's renamed statements).
func (u *Upstream) Prepared(owner uint64, name string) bool {
	_, ok := u.prepared[owner][name]
	return ok
}

// SetPrepared records that the connection holds, or no longer holds, a
// statement of owner's.
func (u *Upstream) SetPrepared(owner uint64, name string, held bool) {
	names := u.prepared[owner]
	_, had := names[name]
	switch {
	case held == had:
		return
	case held && names == nil:
		if u.prepared == nil {
			u.prepared = map[uint64]map[string]struct{}{}
		}
		u.prepared[owner] = map[string]struct{}{name: {}}
		u.nPrepared++
	case held:
		names[name] = struct{}{}
		u.nPrepared++
	default:
		delete(names, name)
		if len(names) == 0 {
			delete(u.prepared, owner)
		}
		u.nPrepared--
	}
}

// PreparedCount is the number of statements the connection holds.
func (u *Upstream) PreparedCount() int { return u.nPrepared }

// PreparedOwners calls f with each client session that has statements on
// the connection.
func (u *Upstream) PreparedOwners(f func(owner uint64)) {
	for owner := range u.prepared {
		f(owner)
	}
}

// DropPrepared forgets owner's statements on the connection, and returns
// their names, for the caller to close.
func (u *Upstream) DropPrepared(owner uint64) []string {
	names := make([]string, 0, len(u.prepared[owner]))
	for name := range u.prepared[owner] {
		names = append(names, name)
	}
	delete(u.prepared, owner)
	u.nPrepared -= len(names)
	return names
}

// Swept is the count of ended sessions whose statements were last closed on
// the connection (the relay's sweep); SetSwept records a sweep.
func (u *Upstream) Swept() uint64 { return u.swept }

// SetSwept records that the statements of the first n ended sessions are
// closed on the connection.
func (u *Upstream) SetSwept(n uint64) { u.swept = n }

// ForgetPrepared records that the connection holds no statement any more
// (DEALLOCATE ALL, DISCARD ALL).
func (u *Upstream) ForgetPrepared() {
	u.prepared, u.nPrepared, u.unnamedOwner, u.preparedUnknown = nil, 0, 0, false
}

// MarkPreparedUnknown records that the connection may hold statements its
// record lacks: a DEALLOCATE ALL that forgot them did not run. It must be
// reset (which drops them) before another client.
func (u *Upstream) MarkPreparedUnknown() { u.preparedUnknown = true }

// PreparedUnknown reports MarkPreparedUnknown since the last
// ForgetPrepared.
func (u *Upstream) PreparedUnknown() bool { return u.preparedUnknown }

// UnnamedOwner is the client session whose unnamed statement the
// connection holds.
func (u *Upstream) UnnamedOwner() uint64 { return u.unnamedOwner }

// SetUnnamedOwner records whose unnamed statement the connection holds.
func (u *Upstream) SetUnnamedOwner(owner uint64) { u.unnamedOwner = owner }

// install sets the grant on the connection, idle, in one round trip and one
// transaction (it is also the health check of a connection taken from the
// pool).
func (u *Upstream) install(ctx context.Context, g *Grant) error {
	return u.installWith(ctx, installBatch(g, u.grant, u.Drift(), u.signer, u.pid, 'I'), g)
}

// open is install on a connection just logged in: with per-role logins, it
// also proves that the login carries no setting of its own.
func (u *Upstream) open(ctx context.Context, g *Grant) error {
	b := installBatch(g, nil, nil, u.signer, u.pid, 'I')
	if u.signer != nil {
		b = plantedCheck(b)
	}
	return u.installWith(ctx, b, g)
}

func (u *Upstream) installWith(ctx context.Context, b *Batch, g *Grant) error {
	err := u.roundTrip(ctx, b)
	if err == nil {
		u.grant = g
		return nil
	}
	return installError(g, err)
}

// installError says what an install's error means for an operator.
func installError(g *Grant, err error) error {
	var se *ServerError
	if errors.As(err, &se) {
		switch se.Code {
		case "42704":
			return fmt.Errorf("role %q does not exist upstream (create it, see `rlsproxy sql`): %w", g.Role, err)
		case "42501":
			return fmt.Errorf("the service login may not switch to role %q (GRANT %s TO the login role, see `rlsproxy sql`): %w", g.Role, g.Role, err)
		}
	}
	return err
}

// Install sets the grant on conn, a pgconn connection that is idle, exactly
// as the proxy does on its own connections (`rlsproxy check` uses it to
// prove the database's side).
func Install(ctx context.Context, conn *pgconn.PgConn, g *Grant, signer *Signer) error {
	b := installBatch(g, nil, nil, signer, conn.PID(), 'I')
	if _, err := conn.Conn().Write(b.Frames); err != nil {
		return err
	}
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return err
		}
		raw, err := msg.Encode(nil)
		if err != nil {
			return err
		}
		if Async(raw[0]) {
			continue
		}
		done, err := b.Answer(raw[0], raw[wire.HeaderLen:])
		if err != nil && raw[0] != 'Z' {
			// Read up to the batch's ReadyForQuery, so that conn stays usable.
			for {
				msg, rerr := conn.ReceiveMessage(ctx)
				if _, z := msg.(*pgproto3.ReadyForQuery); rerr != nil || z {
					return installError(g, err)
				}
			}
		}
		if err != nil {
			return installError(g, err)
		}
		if done {
			return nil
		}
	}
}

// Cancel asks the server to cancel the query running on this session, over a
// new connection to the same address, as libpq does.
func (u *Upstream) Cancel(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, u.addr.Network(), u.addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	msg, err := (&pgproto3.CancelRequest{ProcessID: u.pid, SecretKey: u.secretKey}).Encode(nil)
	if err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return err
	}
	// The server closes the connection once it has read the request.
	_, _ = c.Read(make([]byte, 1))
	return nil
}

// Close ends the upstream session politely (Terminate, then close).
func (u *Upstream) Close() error {
	_ = u.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = u.conn.Write([]byte{'X', 0, 0, 0, 4})
	return u.conn.Close()
}

// Abort closes the connection with a reset (RST) instead of Terminate: the
// server dies at its next write to it. Until then it runs what it has read
// (an extended-protocol pipeline writes nothing before its Sync), so a
// cancel must follow to stop it.
func (u *Upstream) Abort() {
	c := u.conn
	if t, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = t.NetConn()
	}
	if t, ok := c.(*net.TCPConn); ok {
		_ = t.SetLinger(0)
	}
	_ = u.conn.Close()
}

// reset undoes a session: see resetBatch.
func (u *Upstream) reset(ctx context.Context, claimsSetting string) error {
	if claimsSetting == "" {
		claimsSetting = "request.jwt.claims"
	}
	if err := u.roundTrip(ctx, resetBatch(u.txStatus, claimsSetting)); err != nil {
		return err
	}
	// Nothing of the grant is left: the next client, whoever it is, gets
	// a full install.
	u.grant = nil
	u.ForgetPrepared()
	return nil
}

// roundTrip sends one of the proxy's own batches on an idle connection and
// reads its answers, each checked by the batch. ParameterStatus updates
// u.Params; notices are dropped. Nothing may follow the last answer: any
// byte left unread means the answers were not all the batch's.
func (u *Upstream) roundTrip(ctx context.Context, b *Batch) error {
	// At most 10 s, and within the caller's deadline: a pooled connection
	// that does not answer is dropped (Pool.Get tries the next one) before
	// the client's startup timeout runs out.
	deadline := time.Now().Add(10 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = u.conn.SetDeadline(deadline)
	defer u.conn.SetDeadline(time.Time{})
	if _, err := u.conn.Write(b.Frames); err != nil {
		return err
	}
	for {
		typ, body, err := u.reader.ReadMessage()
		if err != nil {
			return err
		}
		if typ == 'S' {
			var ps pgproto3.ParameterStatus
			if ps.Decode(body) == nil {
				u.SetParameter(ps.Name, ps.Value)
			}
		}
		if Async(typ) {
			continue
		}
		done, err := b.Answer(typ, body)
		if err != nil {
			return err
		}
		if done {
			if n := len(u.reader.Buffered()); n > 0 {
				return fmt.Errorf("%d unexpected bytes after the answers to the proxy's own statements", n)
			}
			u.txStatus = b.status
			return nil
		}
	}
}
