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
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// The statements that install a grant. Names, values and the role travel as
// bind parameters, never in the statement text, so pg_stat_activity and
// pg_stat_statements show only these constant texts.
const (
	installSettingsSQL = `SELECT count(pg_catalog.set_config(n, v, false)) FROM unnest($1::text[], $2::text[]) AS s(n, v)`
	installRoleSQL     = `SELECT pg_catalog.set_config('role', $1, false), current_user`
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

	// installed are the install frames of the current grant, kept to
	// re-establish the session after a client's reset.
	installed      []byte
	installedGrant *Grant
}

// InstallFrames returns the frames that install g on this connection,
// computed once per grant.
func (u *Upstream) InstallFrames(g *Grant, signer *Signer) ([]byte, error) {
	if u.installedGrant == g && u.installed != nil {
		return u.installed, nil
	}
	frames, err := InstallFrames(g, signer, u.PID)
	if err != nil {
		return nil, err
	}
	u.installed, u.installedGrant = frames, g
	return frames, nil
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
	if err := Install(ctx, conn, g, d.Signer); err != nil {
		conn.Close(context.Background())
		return nil, &Error{Stage: StageInstall, Err: err}
	}
	hc, err := conn.Hijack()
	if err != nil {
		conn.Close(context.Background())
		return nil, &Error{Stage: StageInstall, Err: err}
	}
	return &Upstream{
		Conn:      hc.Conn,
		addr:      hc.Conn.RemoteAddr(),
		Reader:    wire.NewReader(hc.Conn, d.BufferSize, d.MaxMessage),
		PID:       hc.PID,
		SecretKey: hc.SecretKey,
		Params:    hc.ParameterStatuses,
		TxStatus:  hc.TxStatus,
	}, nil
}

// Install sets the grant's settings and role on conn in one round trip and
// one transaction, then checks that current_user is the granted role. With a
// signer, the claims' signature for conn's backend is set as well.
func Install(ctx context.Context, conn *pgconn.PgConn, g *Grant, signer *Signer) error {
	names, values, role := installParams(g, signer, conn.PID())
	b := &pgconn.Batch{}
	b.ExecParams(installSettingsSQL, [][]byte{names, values}, textArrays, binaryFormats, nil)
	b.ExecParams(installRoleSQL, [][]byte{role}, []uint32{pgtype.TextOID}, nil, nil)
	results, err := conn.ExecBatch(ctx, b).ReadAll()
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" {
			return fmt.Errorf("role %q does not exist upstream (create it, see `rlsproxy sql`): %w", g.Role, err)
		}
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			return fmt.Errorf("the service login may not switch to role %q (GRANT %s TO the login role, see `rlsproxy sql`): %w", g.Role, g.Role, err)
		}
		return err
	}
	if len(results) != 2 || len(results[1].Rows) != 1 || string(results[1].Rows[0][1]) != g.Role {
		return fmt.Errorf("role switch to %q did not take effect", g.Role)
	}
	return nil
}

var (
	textArrays    = []uint32{pgtype.TextArrayOID, pgtype.TextArrayOID}
	binaryFormats = []int16{1, 1}
)

// installParams encodes the bind parameters of the install statements: the
// setting names and values as binary text[] and the role as text.
func installParams(g *Grant, signer *Signer, pid uint32) (names, values, role []byte) {
	n := make([]string, 0, len(g.Settings)+1)
	v := make([]string, 0, len(g.Settings)+1)
	for _, s := range g.Settings {
		n, v = append(n, s.Name), append(v, s.Value)
	}
	if signer != nil && g.Claims != "" {
		n, v = append(n, SignatureSetting), append(v, signer.Sign(pid, g.Claims))
	}
	return encodeTextArray(n), encodeTextArray(v), []byte(g.Role)
}

// encodeTextArray writes a one-dimensional text[] in PostgreSQL's binary
// array format: ndim, has-null flag, element type, then length and lower
// bound of the dimension, then each element as length and bytes.
func encodeTextArray(elems []string) []byte {
	size := 20
	for _, e := range elems {
		size += 4 + len(e)
	}
	b := make([]byte, 0, size)
	if len(elems) == 0 {
		b = binary.BigEndian.AppendUint32(b, 0) // no dimensions
		b = binary.BigEndian.AppendUint32(b, 0)
		return binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	}
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(elems)))
	b = binary.BigEndian.AppendUint32(b, 1)
	for _, e := range elems {
		b = binary.BigEndian.AppendUint32(b, uint32(len(e)))
		b = append(b, e...)
	}
	return b
}

// InstallFrames returns the protocol messages that install the grant on
// backend pid, ending with Sync: the relay sends them after a client's RESET
// ALL or DISCARD ALL to re-establish the session before the client's next
// statement. They use the unnamed statement and portal, which a simple
// Query has already discarded.
func InstallFrames(g *Grant, signer *Signer, pid uint32) ([]byte, error) {
	names, values, role := installParams(g, signer, pid)
	var out []byte
	var err error
	for _, m := range []pgproto3.FrontendMessage{
		// Back to the login role first: a client's RESET of one setting
		// leaves the mapped role in place, which (hardened) may not call
		// set_config.
		&pgproto3.Parse{Query: "RESET ROLE"},
		&pgproto3.Bind{},
		&pgproto3.Execute{},
		&pgproto3.Parse{Query: installSettingsSQL, ParameterOIDs: textArrays},
		&pgproto3.Bind{ParameterFormatCodes: binaryFormats, Parameters: [][]byte{names, values}},
		&pgproto3.Execute{},
		&pgproto3.Parse{Query: installRoleSQL, ParameterOIDs: []uint32{pgtype.TextOID}},
		&pgproto3.Bind{Parameters: [][]byte{role}},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
	} {
		if out, err = m.Encode(out); err != nil {
			return nil, err
		}
	}
	return out, nil
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
