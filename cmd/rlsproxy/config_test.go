package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/devissuer"
)

const testUpstream = "postgres://authenticator:secret@127.0.0.1:5432/app"

// serveArgs are a valid serve command line, args appended: a later flag
// wins, so a case can override any of these.
func serveArgs(args ...string) []string {
	return append([]string{"--upstream", testUpstream, "--issuer", "https://issuer.example.com/", "--client-id", "app"}, args...)
}

// checkServe parses args as serve does and checks them; it returns what was
// logged.
func checkServe(t *testing.T, args []string, dev *devOptions) (*serveConfig, string, error) {
	t.Helper()
	clearEnv(t)
	var o serveOptions
	fs := newFlagSet(o.register)
	if dev != nil {
		fs = newFlagSet(o.registerProxy)
	}
	if err := parseFlags(fs, args); err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	var logs strings.Builder
	cfg, err := o.config(slog.New(slog.NewTextHandler(&logs, nil)), dev)
	return cfg, logs.String(), err
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Every check of config, each with the message a user sees.
func TestServeConfigErrors(t *testing.T) {
	key := writeFile(t, "key", strings.Repeat("ab", 32))
	short := writeFile(t, "short", "too short")
	cert, certKey := selfSigned(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no upstream", []string{"--issuer", "https://issuer.example.com/"}, "--upstream is required"},
		{"bad upstream", serveArgs("--upstream", "postgres://a@host:port/db"), "--upstream:"},
		{"missing key", serveArgs("--signing-key-file", filepath.Join(t.TempDir(), "none")), "--signing-key-file"},
		{"short key", serveArgs("--signing-key-file", short), "at least 32"},
		{"bad role map", serveArgs("--role-map", "admins"), `--role-map entry "admins" is not group=role`},
		{"bad claims setting", serveArgs("--claims-setting", "nodot"), "--claims-setting"},
		{"bad claim prefix", serveArgs("--claim-prefix", "jwt"), "--claim-prefix"},
		{"negative leeway", serveArgs("--leeway", "-1s"), "--leeway must be between 0 and 5m0s"},
		{"long leeway", serveArgs("--leeway", "6m"), "--leeway must be between 0 and 5m0s"},
		{"no issuer", []string{"--upstream", testUpstream}, "no issuer configured"},
		{"region without pool", serveArgs("--issuer", "", "--cognito-region", "eu-west-1"), "give --cognito-region with --cognito-user-pool-id, or --issuer"},
		{"cognito and issuer", serveArgs("--cognito-region", "eu-west-1", "--cognito-user-pool-id", "eu-west-1_X"), "not both"},
		{"cognito without client", serveArgs("--issuer", "", "--client-id", "", "--cognito-region", "eu-west-1", "--cognito-user-pool-id", "eu-west-1_X"), "--client-id is required"},
		{"jwks refresh", serveArgs("--jwks-refresh", "0s"), "--jwks-refresh must be positive"},
		{"max client conns", serveArgs("--max-client-conns", "0"), "--max-client-conns must be at least 1, not 0"},
		{"startup timeout", serveArgs("--startup-timeout", "0s"), "--startup-timeout must be positive"},
		{"shutdown timeout", serveArgs("--shutdown-timeout", "-1s"), "--shutdown-timeout must be 0 or more"},
		{"relay loops", serveArgs("--relay-loops", "-2"), "--relay-loops must be -1"},
		{"token cache 0", serveArgs("--token-cache-size", "0"), "--token-cache-size must be -1 (off) or at least 1"},
		{"token cache -2", serveArgs("--token-cache-size", "-2"), "--token-cache-size must be"},
		{"pool size", serveArgs("--pool-size", "-2"), "--pool-size must be -1"},
		{"max upstream conns", serveArgs("--max-upstream-conns", "-1"), "--max-upstream-conns must be 0"},
		{"pool wait", serveArgs("--pool-wait", "0s"), "--pool-wait must be positive"},
		{"pool idle", serveArgs("--pool-idle-timeout", "-1s"), "--pool-idle-timeout must be 0"},
		{"pool lifetime", serveArgs("--pool-max-lifetime", "-1s"), "--pool-max-lifetime must be 0"},
		{"guard parsers", serveArgs("--guard-parsers", "0"), "--guard-parsers must be at least 1"},
		// uint64(-1) << 20 would be no limit at all.
		{"guard parser memory", serveArgs("--guard-parser-memory", "-1"), "--guard-parser-memory must be at least 1"},
		{"no listener", serveArgs("--listen", " , "), "--listen is empty"},
		{"cert without key", serveArgs("--tls-cert", cert), "give --tls-cert and --tls-key together"},
		{"key without cert", serveArgs("--tls-key", certKey), "give --tls-cert and --tls-key together"},
		{"bad key pair", serveArgs("--tls-cert", cert, "--tls-key", key), "--tls-cert/--tls-key"},
		{"pprof without admin", serveArgs("--pprof", "--admin-listen", ""), "--pprof"},
		{"allow code unsigned", serveArgs("--guard-allow-code"), "--guard-allow-code needs --signing-key-file"},
		{"allow code guard off", serveArgs("--guard-allow-code", "--guard", "off", "--signing-key-file", key), "--guard-allow-code is for --guard on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, logs, err := checkServe(t, tc.args, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v: %v, want %q", tc.args, err, tc.want)
			}
			if cfg != nil || logs != "" {
				t.Fatalf("a config (%v) or warnings (%q) with an error", cfg, logs)
			}
		})
	}
}

// A valid command line becomes the packages' configs, and the settings
// that weaken protection are logged.
func TestServeConfig(t *testing.T) {
	key := writeFile(t, "key", strings.Repeat("ab", 32))
	cert, certKey := selfSigned(t)
	cfg, logs, err := checkServe(t, serveArgs("--listen", "127.0.0.1:1, /tmp", "--signing-key-file", key,
		"--tls-cert", cert, "--tls-key", certKey, "--on-token-expiry", "ignore", "--leeway", "1m",
		"--role-map", "admins=app_admin", "--databases", "app,other", "--guard-parser-memory", "64"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if logs != "" {
		t.Errorf("warnings: %s", logs)
	}
	switch {
	case !slices.Equal(cfg.listen, []string{"127.0.0.1:1", "/tmp"}):
		t.Errorf("listen %v", cfg.listen)
	case cfg.admin != "127.0.0.1:9187" || cfg.shutdownTimeout != 30*time.Second:
		t.Errorf("admin %q, shutdown %s", cfg.admin, cfg.shutdownTimeout)
	case cfg.signer == nil || cfg.dialer == nil || cfg.dialer.User() != "authenticator" || cfg.dialer.Database() != "app":
		t.Errorf("signer %v, dialer %v", cfg.signer, cfg.dialer)
	case len(cfg.policy.RoleMap) != 1 || cfg.policy.DefaultRole != "authenticated":
		t.Errorf("policy %+v", cfg.policy)
	case cfg.guard == nil || cfg.guard.limits.Helpers != 2 || cfg.guard.limits.Memory != 64<<20:
		t.Errorf("guard %+v", cfg.guard)
	case cfg.pool.Size != 20 || cfg.pool.WaitTimeout != 5*time.Second:
		t.Errorf("pool %+v", cfg.pool)
	case cfg.auth.Issuer != "https://issuer.example.com/" || cfg.auth.Cognito || !slices.Equal(cfg.auth.ClientIDs, []string{"app"}) ||
		cfg.auth.TokenUse != "access" || cfg.auth.Leeway != time.Minute || cfg.auth.CacheSize != 10000:
		t.Errorf("auth %+v", cfg.auth)
	case cfg.proxy.TLS == nil || cfg.proxy.TerminateOnExpiry || cfg.proxy.ExpiryLeeway != time.Minute ||
		!slices.Equal(cfg.proxy.Databases, []string{"app", "other"}) || cfg.proxy.MaxClientConns != 1000:
		t.Errorf("proxy %+v", cfg.proxy)
	case cfg.dev != nil:
		t.Errorf("dev %+v", cfg.dev)
	}

	cfg, _, err = checkServe(t, serveArgs("--signing-key-file", key, "--guard-allow-code"), nil)
	if err != nil || cfg.guard == nil || !cfg.guard.allowCode {
		t.Fatalf("--guard-allow-code: %v %+v", err, cfg)
	}
	if cfg, _, _ = checkServe(t, serveArgs("--signing-key-file", key), nil); cfg.guard.allowCode {
		t.Fatal("code allowed without --guard-allow-code")
	}

	cfg, _, err = checkServe(t, serveArgs("--issuer", "", "--cognito-region", "eu-west-1", "--cognito-user-pool-id", "eu-west-1_X"), nil)
	if err != nil || !cfg.auth.Cognito || cfg.auth.Issuer != "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_X" {
		t.Fatalf("cognito: %v %+v", err, cfg)
	}

	cfg, logs, err = checkServe(t, serveArgs("--guard", "off", "--client-id", ""), nil)
	if err != nil || cfg.guard != nil || !strings.Contains(logs, "--guard off") || !strings.Contains(logs, "no --audience or --client-id") {
		t.Fatalf("guard off, no client: %v %+v\n%s", err, cfg, logs)
	}
}

// rlsproxy dev provides the issuer (and without --upstream the database);
// its own flags are checked with the rest.
func TestDevConfig(t *testing.T) {
	dev := func(mod func(*devOptions)) *devOptions {
		d := &devOptions{dir: t.TempDir(), issuerListen: "127.0.0.1:0", ttl: time.Hour}
		if mod != nil {
			mod(d)
		}
		return d
	}
	cfg, logs, err := checkServe(t, nil, dev(nil))
	if err != nil || logs != "" {
		t.Fatalf("%v\n%s", err, logs)
	}
	if cfg.dialer != nil || cfg.auth.Issuer != "" || !slices.Equal(cfg.auth.ClientIDs, []string{devissuer.ClientID}) || cfg.dev == nil {
		t.Fatalf("%+v", cfg)
	}
	if cfg, _, err := checkServe(t, []string{"--upstream", testUpstream}, dev(nil)); err != nil || cfg.dialer == nil {
		t.Fatalf("with --upstream: %v", err)
	}

	for _, tc := range []struct {
		name string
		mod  func(*devOptions)
		want string
	}{
		{"no dir", func(d *devOptions) { d.dir = "" }, "--dev-dir is empty"},
		{"not host:port", func(d *devOptions) { d.issuerListen = "localhost" }, "--issuer-listen:"},
		{"all interfaces", func(d *devOptions) { d.issuerListen = ":0" }, "must be a loopback address"},
		{"not loopback", func(d *devOptions) { d.issuerListen = "0.0.0.0:0" }, "must be a loopback address"},
		{"ttl", func(d *devOptions) { d.ttl = 0 }, "--ttl must be positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := checkServe(t, nil, dev(tc.mod)); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want %q", err, tc.want)
			}
		})
	}
}

func TestSQLConfig(t *testing.T) {
	key := writeFile(t, "key", strings.Repeat("ab", 32))
	for _, tc := range []struct {
		name string
		args []string
		want string // "" for a valid command line
	}{
		{"defaults", nil, ""},
		{"readme", []string{"--upstream", testUpstream, "--role-map", "admins=app_admin", "--signing-key-file", key, "--harden"}, ""},
		{"bad upstream", []string{"--upstream", "postgres://a@host:port/db"}, "--upstream:"},
		{"bad role map", []string{"--role-map", "admins"}, "is not group=role"},
		{"long leeway", []string{"--leeway", "1h"}, "--leeway must be between"},
		{"missing key", []string{"--signing-key-file", filepath.Join(t.TempDir(), "none")}, "--signing-key-file"},
		{"transition without key", []string{"--transition"}, "--transition"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearEnv(t)
			var o sqlOptions
			if err := parseFlags(newFlagSet(o.register), tc.args); err != nil {
				t.Fatal(err)
			}
			opts, err := o.config()
			if tc.want == "" {
				if err != nil || opts.Leeway != 30*time.Second {
					t.Fatalf("%v %+v", err, opts)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want %q", err, tc.want)
			}
		})
	}
}

func TestCheckConfig(t *testing.T) {
	clearEnv(t)
	var o checkOptions
	if err := parseFlags(newFlagSet(o.register), []string{"--role", "web"}); err != nil {
		t.Fatal(err)
	}
	if _, err := o.config(); err == nil || !strings.Contains(err.Error(), "--upstream is required") {
		t.Fatalf("no upstream: %v", err)
	}
	o.claimsSetting = "nodot"
	o.upstream = testUpstream
	if _, err := o.config(); err == nil || !strings.Contains(err.Error(), "--claims-setting") {
		t.Fatalf("bad policy: %v", err)
	}
}

// selfSigned writes a certificate and its key for --tls-cert/--tls-key.
func selfSigned(t *testing.T) (cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "rlsproxy"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))),
		writeFile(t, "key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})))
}

// A certificate renewed on disk is served after a reload; one that does
// not load leaves the previous one in use.
func TestCertReloader(t *testing.T) {
	certFile, keyFile := selfSigned(t)
	c, err := newCertReloader(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	first, _ := c.getCertificate(nil)
	renewedCert, renewedKey := selfSigned(t)
	for _, f := range [][2]string{{renewedCert, certFile}, {renewedKey, keyFile}} {
		b, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.reload(); err != nil {
		t.Fatal(err)
	}
	renewed, _ := c.getCertificate(nil)
	if bytes.Equal(renewed.Certificate[0], first.Certificate[0]) {
		t.Fatal("the renewed certificate is not served")
	}
	if err := os.WriteFile(certFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.reload(); err == nil {
		t.Fatal("a broken certificate loaded")
	}
	if kept, _ := c.getCertificate(nil); !bytes.Equal(kept.Certificate[0], renewed.Certificate[0]) {
		t.Fatal("a failed reload replaced the certificate")
	}
}

// --pool-size defaults to what --max-upstream-conns allows, so that
// connect-per-query load up to the bound reuses connections; 20 without it.
func TestPoolSizeDefault(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{serveArgs(), 20},
		{serveArgs("--max-upstream-conns", "200"), 200},
		{serveArgs("--max-upstream-conns", "5"), 5},
		{serveArgs("--max-upstream-conns", "200", "--pool-size", "50"), 50},
		{serveArgs("--pool-size", "0"), 0},
	} {
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		var o serveOptions
		o.register(fs)
		if err := parseFlags(fs, tc.args); err != nil {
			t.Fatal(err)
		}
		cfg, err := o.config(slog.New(slog.DiscardHandler), nil)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.pool.Size != tc.want {
			t.Errorf("%v: pool size %d, want %d", tc.args, cfg.pool.Size, tc.want)
		}
	}
}
