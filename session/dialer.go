package session

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// Stage says where opening an upstream session failed.
type Stage int

const (
	StageConnect Stage = iota // the service login failed
	StageInstall              // the login worked, the role or settings did not
)

// OpenError is a failure to open an upstream session.
type OpenError struct {
	Stage Stage
	Err   error
}

func (e *OpenError) Error() string {
	if e.Stage == StageConnect {
		return "upstream connection failed: " + e.Err.Error()
	}
	return "upstream session setup failed: " + e.Err.Error()
}

func (e *OpenError) Unwrap() error { return e.Err }

// ErrPlantedSettings refuses a connection whose login carries settings of
// its own: a session that reached the login (RESET ROLE) may have planted
// them, with ALTER ROLE ... SET, for every later session of its role.
var ErrPlantedSettings = errors.New("the login role carries settings of its own (ALTER ROLE ... SET), which a client session may have planted: refusing the connection (`rlsproxy check` lists them; `rlsproxy sql` removes them)")

// ErrLoginPassword is a role's own login refusing the password derived from
// the signing key: the key is not the one `rlsproxy sql` provisioned, or a
// session that reached the login changed its password (ALTER ROLE ...
// PASSWORD), which denies service to its role until `rlsproxy sql` runs
// again.
var ErrLoginPassword = errors.New("the login refused the password derived from --signing-key-file: the key is not the one `rlsproxy sql` provisioned, or a client session changed the login's password (`rlsproxy check` tells which; `rlsproxy sql` sets it again)")

// Dialer logs in upstream with the service credentials.
type Dialer struct {
	config *pgconn.Config // the parsed --upstream DSN, copied for every connection
	signer *Signer        // signs the claims of every session; nil: unsigned
	// bufferSize is the read buffer of each upstream connection, maxMessage
	// the largest message read whole from upstream.
	bufferSize, maxMessage int
}

// NewDialer parses an upstream DSN (URL or keyword/value, libpq rules, PG*
// environment variables included). With a signer, every session's claims are
// signed (--signing-key-file).
func NewDialer(dsn string, signer *Signer) (*Dialer, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("--upstream: %w", err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	return &Dialer{config: cfg, signer: signer, bufferSize: 32 << 10, maxMessage: 64 << 20}, nil
}

// Database returns the database of the upstream DSN.
func (d *Dialer) Database() string { return d.config.Database }

// User returns the service login role.
func (d *Dialer) User() string { return d.config.User }

// Connect logs in with the service credentials and nothing more: for
// `rlsproxy check`, and to prove the database answers.
func (d *Dialer) Connect(ctx context.Context) (*pgconn.PgConn, error) {
	return pgconn.ConnectConfig(ctx, d.config.Copy())
}

// ConnectAs logs in as the proxy does for a session of mapped role role
// (its own login, with a signing key; the service login without) and
// nothing more: for `rlsproxy check`'s round trip.
func (d *Dialer) ConnectAs(ctx context.Context, role string) (*pgconn.PgConn, error) {
	cfg := d.config.Copy()
	if d.signer != nil {
		cfg.User = LoginFor(d.config.User, role)
		cfg.Password = d.signer.LoginPassword(cfg.User)
	}
	return pgconn.ConnectConfig(ctx, cfg)
}

// Open connects to database with the given startup parameters, installs the
// grant, and hands over the raw connection. With a signing key it logs in as
// the grant's role's own login (logins.go), and refuses a login that carries
// settings of its own: a session that reached that login (RESET ROLE) could
// have planted them for every later session (ALTER ROLE ... SET).
func (d *Dialer) Open(ctx context.Context, database string, params map[string]string, g *Grant) (*Upstream, error) {
	cfg := d.config.Copy()
	cfg.Database = database
	if d.signer != nil {
		cfg.User = LoginFor(d.config.User, g.Role)
		cfg.Password = d.signer.LoginPassword(cfg.User)
	}
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		var pgErr *pgconn.PgError
		if d.signer != nil && errors.As(err, &pgErr) && pgErr.Code == "28P01" {
			err = fmt.Errorf("login %s: %w: %w", cfg.User, ErrLoginPassword, err)
		}
		return nil, &OpenError{Stage: StageConnect, Err: err}
	}
	// pgconn may still have a read of its own under way on the socket (it
	// reads in the background while a write of its is slow, as under load):
	// that read would take the answer to the install below. SyncConn stops
	// it, as pgconn asks before Hijack.
	if err := conn.SyncConn(ctx); err != nil {
		conn.Close(context.Background())
		return nil, &OpenError{Stage: StageConnect, Err: err}
	}
	hc, err := conn.Hijack()
	if err != nil {
		conn.Close(context.Background())
		return nil, &OpenError{Stage: StageInstall, Err: err}
	}
	u := &Upstream{
		conn:      hc.Conn,
		addr:      hc.Conn.RemoteAddr(),
		reader:    wire.NewReader(hc.Conn, d.bufferSize, d.maxMessage),
		pid:       hc.PID,
		secretKey: hc.SecretKey,
		params:    hc.ParameterStatuses,
		txStatus:  hc.TxStatus,
		signer:    d.signer,
	}
	u.initial = make(map[string]string, len(CarriedSettings))
	for _, name := range CarriedSettings {
		u.initial[name] = u.params[name]
	}
	if err := u.open(ctx, g); err != nil {
		_ = u.Close()
		return nil, &OpenError{Stage: StageInstall, Err: err}
	}
	return u, nil
}

// NewUpstream takes over a connection that is logged in, idle and running
// with grant g as backend pid: for tests that play the server themselves.
// The proxy's own connections come from Open.
func NewUpstream(c net.Conn, pid uint32, g *Grant) *Upstream {
	return &Upstream{conn: c, reader: wire.NewReader(c, 32<<10, 64<<20), pid: pid, grant: g,
		params: map[string]string{}, txStatus: 'I'}
}
