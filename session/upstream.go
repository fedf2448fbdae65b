package session

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// Stage says where opening an upstream session failed.
type Stage int

const (
	StageConnect Stage = iota // the service login failed
	StageInstall              // the login worked, the role or settings did not
)

// Error is a failure to open an upstream session.
type Error struct {
	Stage Stage
	Err   error
}

func (e *Error) Error() string {
	if e.Stage == StageConnect {
		return "upstream connection failed: " + e.Err.Error()
	}
	return "upstream session setup failed: " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// Dialer opens upstream sessions with the service credentials.
type Dialer struct {
	// Config is the parsed --upstream DSN; it is copied for every connection.
	Config *pgconn.Config
	// BufferSize is the read buffer of each upstream connection.
	BufferSize int
	// MaxMessage bounds messages read whole from upstream.
	MaxMessage int
	// Signer, when set, signs the claims of every session (--signing-key-file).
	Signer *Signer
}

// NewDialer parses an upstream DSN (URL or keyword/value, libpq rules,
// PG* environment variables included).
func NewDialer(dsn string) (*Dialer, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("--upstream: %w", err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	return &Dialer{Config: cfg, BufferSize: 32 << 10, MaxMessage: 64 << 20}, nil
}

// Database returns the database of the upstream DSN.
func (d *Dialer) Database() string { return d.Config.Database }

// User returns the service login role.
func (d *Dialer) User() string { return d.Config.User }

// Upstream is an established upstream session, taken over from pgconn so its
// frames can be relayed raw. It may outlive a client session.
type Upstream struct {
	Conn      net.Conn
	Reader    *wire.Reader
	PID       uint32
	SecretKey []byte
	// Params are the server's ParameterStatus values, for the client.
	Params map[string]string
	// TxStatus is the transaction status of the last ReadyForQuery.
	TxStatus byte

	key  string    // the pool key: database and startup parameters
	born time.Time // when the connection was opened
	// addr is the server's address, for cancel requests: Conn may be
	// replaced while a session is relayed (proxy/relay_loop_linux.go).
	addr net.Addr

	signer *Signer
}

// InstallBatch returns the batch that installs g on this connection, now in
// transaction status status, with a fresh nonce: the relay sends it to
// re-establish the session after a client's reset.
func (u *Upstream) InstallBatch(g *Grant, status byte) *Batch {
	return installBatch(g, u.signer, u.PID, status)
}

// Open connects to database with the given startup parameters, installs the
// grant, and hands over the raw connection.
func (d *Dialer) Open(ctx context.Context, database string, params map[string]string, g *Grant) (*Upstream, error) {
	cfg := d.Config.Copy()
	if database != "" {
		cfg.Database = database
	}
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, &Error{Stage: StageConnect, Err: err}
	}
	hc, err := conn.Hijack()
	if err != nil {
		conn.Close(context.Background())
		return nil, &Error{Stage: StageInstall, Err: err}
	}
	u := &Upstream{
		Conn:      hc.Conn,
		addr:      hc.Conn.RemoteAddr(),
		Reader:    wire.NewReader(hc.Conn, d.BufferSize, d.MaxMessage),
		PID:       hc.PID,
		SecretKey: hc.SecretKey,
		Params:    hc.ParameterStatuses,
		TxStatus:  hc.TxStatus,
		signer:    d.Signer,
	}
	if err := u.install(ctx, g); err != nil {
		_ = u.Close()
		return nil, &Error{Stage: StageInstall, Err: err}
	}
	return u, nil
}

// install sets the grant on the connection, idle, in one round trip and one
// transaction (it is also the health check of a connection taken from the
// pool).
func (u *Upstream) install(ctx context.Context, g *Grant) error {
	err := u.roundTrip(ctx, installBatch(g, u.signer, u.PID, 'I'))
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
	b := installBatch(g, signer, conn.PID(), 'I')
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
					return err
				}
			}
		}
		if err != nil || done {
			return err
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
	msg, err := (&pgproto3.CancelRequest{ProcessID: u.PID, SecretKey: u.SecretKey}).Encode(nil)
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
	_ = u.Conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = u.Conn.Write([]byte{'X', 0, 0, 0, 4})
	return u.Conn.Close()
}

// Ping checks that the upstream accepts the service login.
func (d *Dialer) Ping(ctx context.Context) error {
	conn, err := pgconn.ConnectConfig(ctx, d.Config.Copy())
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}
