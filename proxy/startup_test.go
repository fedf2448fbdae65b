package proxy_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/proxy"
)

// A protocol 3.2 client is negotiated down to 3.0 with
// NegotiateProtocolVersion, which also lists the _pq_ options refused.
func TestProtocol32NegotiatedDown(t *testing.T) {
	p := proxytest.Start(t, pg)
	c := dialRaw(t, p.Addr)
	if _, err := c.Write(startupPacket(3<<16|2, "user", "user1", "database", demo.Database, "_pq_.test_option", "x")); err != nil {
		t.Fatal(err)
	}
	npv, ok := c.receive(t).(*pgproto3.NegotiateProtocolVersion)
	if !ok || npv.NewestMinorProtocol != 0 || len(npv.UnrecognizedOptions) != 1 || npv.UnrecognizedOptions[0] != "_pq_.test_option" {
		t.Fatalf("want NegotiateProtocolVersion(0, [_pq_.test_option]), got %#v", npv)
	}
	if _, ok := c.receive(t).(*pgproto3.AuthenticationCleartextPassword); !ok {
		t.Fatal("no password request")
	}
	c.send(t, &pgproto3.PasswordMessage{Password: p.Token(t, "user1")})
	var key *pgproto3.BackendKeyData
	for {
		m := c.receive(t)
		if k, ok := m.(*pgproto3.BackendKeyData); ok {
			key = k
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("error: %s", e.Message)
		}
	}
	if key == nil || len(key.SecretKey) != 4 {
		t.Fatalf("BackendKeyData of protocol 3.0 (4-byte secret) expected, got %#v", key)
	}
	c.send(t, &pgproto3.Query{String: "SELECT count(*) FROM notes"})
	for {
		m := c.receive(t)
		if d, ok := m.(*pgproto3.DataRow); ok && string(d.Values[0]) != "2" {
			t.Fatalf("rows: %s", d.Values[0])
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
}

// Startup packets PostgreSQL would drop are dropped: too long, too slow,
// and unknown major versions are refused.
func TestStartupLimits(t *testing.T) {
	p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.StartupTimeout = 300 * time.Millisecond })

	t.Run("over 10000 bytes", func(t *testing.T) {
		c := dialRaw(t, p.Addr)
		huge := startupPacket(3<<16, "user", "user1", "application_name", strings.Repeat("a", 10000))
		_, _ = c.Write(huge)
		if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
			t.Fatal("an oversized startup packet got an answer")
		}
	})
	t.Run("stalled", func(t *testing.T) {
		c := dialRaw(t, p.Addr)
		start := time.Now()
		_, _ = c.Write([]byte{0, 0}) // half a length, then nothing
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a stalled startup got an answer")
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("stalled startup held for %v", d)
		}
	})
	t.Run("stalled at the password", func(t *testing.T) {
		c := dialRaw(t, p.Addr)
		_, _ = c.Write(startupPacket(3<<16, "user", "user1", "database", demo.Database))
		if _, ok := c.receive(t).(*pgproto3.AuthenticationCleartextPassword); !ok {
			t.Fatal("no password request")
		}
		if _, err := c.fe.Receive(); err == nil {
			t.Fatal("a client that never sent its token kept its connection")
		}
	})
	t.Run("protocol 2", func(t *testing.T) {
		c := dialRaw(t, p.Addr)
		_, _ = c.Write(startupPacket(2<<16, "user", "user1"))
		e, ok := c.receive(t).(*pgproto3.ErrorResponse)
		if !ok || e.Code != "0A000" {
			t.Fatalf("want 0A000, got %#v", e)
		}
	})
	t.Run("GSSENCRequest refused", func(t *testing.T) {
		c := dialRaw(t, p.Addr)
		_, _ = c.Write([]byte{0, 0, 0, 8, 4, 210, 22, 48})
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != 'N' {
			t.Fatalf("GSSENCRequest answer %q, %v", b, err)
		}
	})
}

// Startup parameters are forwarded, except those that set identity, and
// replication connections are refused.
func TestStartupParameters(t *testing.T) {
	p := proxytest.Start(t, pg)
	tok := p.Token(t, "user1")
	out, err := psql(t, p.DSN("user1", "")+" application_name=myapp options='-c search_path=pg_catalog,public -c statement_timeout=1234'", tok, nil,
		"-c", "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('statement_timeout')")
	if err != nil || out != "myapp|pg_catalog,public|1234ms" {
		t.Fatalf("forwarded parameters: %q %v", out, err)
	}
	for _, tc := range []struct{ extra, want string }{
		{"options='-c role=postgres'", `"role"`},
		{"options='-crole=postgres'", `"role"`},
		{"options='--session-authorization=postgres'", `"session_authorization"`},
		{`options='-c jwt.claims.sub=user2'`, `"jwt.claims.sub"`},
		{`options='-c JWT.Claims.Sub=user2'`, `"JWT.Claims.Sub"`},
		{`options='-c request.jwt.claims={}'`, `"request.jwt.claims"`},
		{"options='-B 100'", `"-B"`},
		{"replication=database", "replication"},
	} {
		out, err := psql(t, p.DSN("user1", "")+" "+tc.extra, tok, nil, "-c", "SELECT 1")
		if err == nil || !strings.Contains(out, tc.want) || !strings.Contains(out, "not allowed") {
			t.Errorf("%s: want refusal naming %s, got %v %q", tc.extra, tc.want, err, out)
		}
	}
}

// Only the databases of --databases are served.
func TestDatabases(t *testing.T) {
	p := proxytest.Start(t, pg)
	tok := p.Token(t, "user1")
	dsn := strings.Replace(p.DSN("user1", tok), "dbname=app", "dbname=postgres", 1)
	if e := connectErr(t, dsn); e.Code != "3D000" || !strings.Contains(e.Message, "not served") {
		t.Fatalf("got %s %s", e.Code, e.Message)
	}
	any := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.Databases = []string{"*"} })
	out, err := psql(t, strings.Replace(any.DSN("user1", ""), "dbname=app", "dbname=postgres", 1), any.Token(t, "user1"), nil, "-c", "SELECT current_database()")
	if err != nil || out != "postgres" {
		t.Fatalf("with --databases '*': %q %v", out, err)
	}
}

// Beyond --max-client-conns, clients get 53300.
func TestMaxClientConns(t *testing.T) {
	p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.MaxClientConns = 2 })
	connect(t, p, "user1", p.Token(t, "user1"))
	connect(t, p, "user2", p.Token(t, "user2"))
	if e := connectErr(t, p.DSN("user1", p.Token(t, "user1"))); e.Code != "53300" {
		t.Fatalf("third client: %s %s", e.Code, e.Message)
	}
}

// remoteListener makes accepted connections look as if they came from
// another host (203.0.113.7 unless ip is set), so the loopback exemption
// does not apply.
type remoteListener struct {
	net.Listener
	ip string
}

func (l remoteListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	ip := l.ip
	if ip == "" {
		ip = "203.0.113.7"
	}
	return remoteConn{c, ip}, nil
}

type remoteConn struct {
	net.Conn
	ip string
}

func (c remoteConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.ParseIP(c.ip), Port: 50000}
}

// Tokens are refused over plaintext from a non-loopback peer, unless
// --insecure-plaintext; over TLS they are accepted.
func TestPlaintextFromRemotePeer(t *testing.T) {
	listen := func() net.Listener {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return remoteListener{Listener: l}
	}
	p := proxytest.StartListener(t, pg, listen())
	e := connectErr(t, p.DSN("user1", p.Token(t, "user1")))
	if e.Code != "28000" || !strings.Contains(e.Message, "unencrypted connection from 203.0.113.7") || !strings.Contains(e.Message, "sslmode=require") {
		t.Fatalf("got %s %q", e.Code, e.Message)
	}

	insecure := proxytest.StartListener(t, pg, listen(), func(c *proxytest.Setup) { c.InsecurePlaintext = true })
	connect(t, insecure, "user1", insecure.Token(t, "user1"))

	ca := newTestCA(t)
	secure := proxytest.StartListener(t, pg, listen(), func(c *proxytest.Setup) { c.TLS = ca.serverConfig })
	out, err := psql(t, secure.DSN("user1", "")+" sslmode=require", secure.Token(t, "user1"), nil, "-c", "SELECT count(*) FROM notes")
	if err != nil || out != "2" {
		t.Fatalf("TLS from a remote peer: %q %v", out, err)
	}
}

// TLS: SSLRequest is answered S when a certificate is configured, and psql
// connects with sslmode=require and verify-full; without a certificate it is
// answered N.
func TestTLS(t *testing.T) {
	ca := newTestCA(t)
	p := proxytest.Start(t, pg, func(c *proxytest.Setup) { c.TLS = ca.serverConfig })
	tok := p.Token(t, "user1")
	for _, mode := range []string{
		"sslmode=require",
		"sslmode=verify-full sslrootcert=" + ca.certFile,
	} {
		dsn := strings.Replace(p.DSN("user1", ""), "sslmode=disable", mode, 1)
		dsn = strings.Replace(dsn, "host=127.0.0.1", "host=localhost", 1)
		out, err := psql(t, dsn, tok, nil, "-c", "SELECT count(*) FROM notes")
		if err != nil || out != "2" {
			t.Fatalf("%s: %q %v", mode, out, err)
		}
	}
	// pgx too, with verify-full.
	dsn := strings.Replace(p.DSN("user1", tok), "sslmode=disable", "sslmode=verify-full sslrootcert="+ca.certFile, 1)
	dsn = strings.Replace(dsn, "host=127.0.0.1", "host=localhost", 1)
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatalf("pgx with verify-full: %v", err)
	}
	conn.Close(context.Background())

	plain := proxytest.Start(t, pg)
	out, err := psql(t, strings.Replace(plain.DSN("user1", ""), "sslmode=disable", "sslmode=require", 1), tok, nil, "-c", "SELECT 1")
	if err == nil || !strings.Contains(out, "does not support SSL") {
		t.Fatalf("sslmode=require without a certificate: %q %v", out, err)
	}
}

type testCA struct {
	certFile     string
	serverConfig *tls.Config
}

// newTestCA makes a CA and a server certificate for localhost and 127.0.0.1.
func newTestCA(t *testing.T) *testCA {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "rlsproxy test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, srvKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return &testCA{certFile: certFile, serverConfig: &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}},
		MinVersion:   tls.VersionTLS12,
	}}
}

// The unix socket listener works like PostgreSQL's: psql host=/dir port=N.
func TestUnixSocket(t *testing.T) {
	dir := t.TempDir()
	l, err := proxy.Listen(dir + ":6499")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ".s.PGSQL.6499")); err != nil {
		t.Fatal(err)
	}
	p := proxytest.StartListener(t, pg, l)
	out, err := psql(t, "host="+dir+" port=6499 dbname=app user=user2", p.Token(t, "user2"), nil, "-c", "SELECT content FROM notes")
	if err != nil || out != "user2: water the plants" {
		t.Fatalf("over the unix socket: %q %v", out, err)
	}
}

// Shutdown refuses new clients and, past its deadline, ends the sessions
// still open with FATAL 57P01.
func TestShutdownDrains(t *testing.T) {
	p := proxytest.Start(t, pg)
	conn := connect(t, p, "user1", p.Token(t, "user1"))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { p.Server.Shutdown(ctx); close(done) }()
	time.Sleep(100 * time.Millisecond)
	if _, err := net.DialTimeout("tcp", p.Addr, time.Second); err == nil {
		t.Error("a new connection was accepted during shutdown")
	}
	if _, err := conn.Exec(context.Background(), "SELECT 1"); err != nil {
		t.Fatalf("a session was cut before the drain deadline: %v", err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return")
	}
	_, err := conn.Exec(context.Background(), "SELECT 1")
	if err == nil || !strings.Contains(err.Error(), "shutting down") {
		t.Fatalf("after the deadline: %v", err)
	}
}

// Failed authentications are limited per client address: past the burst,
// even a good token is refused with a clear message until the allowance
// refills; other addresses and loopback are not affected.
func TestAuthFailuresRateLimited(t *testing.T) {
	limited := func(c *proxytest.Setup) {
		c.InsecurePlaintext = true
		c.AuthFailureBurst, c.AuthFailureInterval = 3, time.Minute
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := proxytest.StartListener(t, pg, remoteListener{Listener: l}, limited)
	for i := range 3 {
		if e := connectErr(t, p.DSN("user1", "bad-token")); e.Code != "28P01" {
			t.Fatalf("failure %d: %s %s", i+1, e.Code, e.Message)
		}
	}
	e := connectErr(t, p.DSN("user1", p.Token(t, "user1")))
	if e.Code != "08004" || !strings.Contains(e.Message, "too many failed authentications from 203.0.113.7") {
		t.Fatalf("after the burst: %s %s", e.Code, e.Message)
	}

	// Another address, same server.
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.Server.Serve(context.Background(), remoteListener{Listener: l2, ip: "198.51.100.9"}) }()
	other := *p
	other.Addr, other.Port = l2.Addr().String(), l2.Addr().(*net.TCPAddr).Port
	connect(t, &other, "user1", p.Token(t, "user1"))

	// Loopback is never limited.
	lo := proxytest.Start(t, pg, limited)
	for range 5 {
		connectErr(t, lo.DSN("user1", "bad-token"))
	}
	connect(t, lo, "user1", lo.Token(t, "user1"))
}
