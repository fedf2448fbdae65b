package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/devissuer"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
	"github.com/rlsproxy/rlsproxy/session"
)

// devState is what `rlsproxy dev` leaves for `rlsproxy token`.
type devState struct {
	Issuer string `json:"issuer"`
}

func defaultDevDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "rlsproxy")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "rlsproxy")
	}
	return ".rlsproxy"
}

func cmdDev(args []string) error {
	fs := flag.NewFlagSet("rlsproxy dev", flag.ContinueOnError)
	var o serveOptions
	var d devOptions
	o.registerProxy(fs) // not the issuer's flags: dev is the issuer
	d.registerDev(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage of rlsproxy dev: serve's flags but the issuer's (dev runs its own issuer; use rlsproxy serve for a real one), and its own:\n")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log := o.logger(os.Stderr)
	cfg, err := o.config(log, &d)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if err := os.MkdirAll(cfg.dev.dir, 0o700); err != nil {
		return err
	}
	key, err := devissuer.LoadOrCreateKey(filepath.Join(cfg.dev.dir, "dev-key.pem"))
	if err != nil {
		return err
	}
	il, err := net.Listen("tcp", cfg.dev.issuerListen)
	if err != nil {
		return fmt.Errorf("--issuer-listen: %w", err)
	}
	issuer, err := devissuer.New("http://"+il.Addr().String(), key)
	if err != nil {
		return err
	}
	go func() { _ = (&http.Server{Handler: issuer, ReadHeaderTimeout: 5 * time.Second}).Serve(il) }()
	state, _ := json.Marshal(devState{Issuer: issuer.URL})
	if err := os.WriteFile(filepath.Join(cfg.dev.dir, "issuer.json"), state, 0o600); err != nil {
		return err
	}
	cfg.auth.Issuer = issuer.URL

	upstreamNote := o.upstream
	if cfg.dialer == nil {
		// The recommended setup: one login per mapped role, signed claims,
		// with a key of the dev dir's unless --signing-key-file names one.
		keyFile := o.signingKeyFile
		if cfg.signer == nil {
			keyFile = filepath.Join(cfg.dev.dir, "signing.key")
			if cfg.signer, err = loadOrCreateSigningKey(keyFile); err != nil {
				return err
			}
		}
		fmt.Fprintln(os.Stderr, "rlsproxy dev: starting a throwaway PostgreSQL...")
		cluster, err := pgtemp.Start(ctx, pgtemp.Options{})
		if err != nil {
			return err
		}
		defer cluster.Stop()
		dsn, err := demo.Setup(ctx, cluster)
		if err != nil {
			return err
		}
		if err := demo.Recommended(ctx, cluster, cfg.signer, cfg.policy, cfg.auth.Leeway); err != nil {
			return err
		}
		if cfg.dialer, err = session.NewDialer(dsn, cfg.signer); err != nil {
			return err
		}
		upstreamNote = fmt.Sprintf("throwaway PostgreSQL on 127.0.0.1:%d, database %s (removed on exit);\n"+
			"            one login per role (%s), claims signed with %s",
			cluster.Port, demo.Database, session.LoginFor(demo.Login, cfg.policy.DefaultRole), keyFile)
	}

	return runProxy(ctx, cfg, log, func(addrs []net.Addr) {
		tokens := map[string]string{}
		for _, sub := range []string{"user1", "user2"} {
			tokens[sub], _ = issuer.Mint(devissuer.TokenRequest{Subject: sub, TTL: cfg.dev.ttl})
		}
		fmt.Print(devBanner(addrs, issuer.URL, upstreamNote, tokens))
	})
}

// loadOrCreateSigningKey reads the dev dir's signing key, first writing a
// new random one if there is none: the same key across runs, as a
// deployment would keep one.
func loadOrCreateSigningKey(path string) (*session.Signer, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case err == nil:
		key := make([]byte, 32)
		_, _ = rand.Read(key)
		_, err = fmt.Fprintln(f, hex.EncodeToString(key))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
	case !errors.Is(err, fs.ErrExist):
		return nil, err
	}
	return session.LoadSigner(path)
}

func devBanner(addrs []net.Addr, issuerURL, upstream string, tokens map[string]string) string {
	host, port := "127.0.0.1", "6432"
	for _, a := range addrs {
		if ta, ok := a.(*net.TCPAddr); ok {
			host, port = ta.IP.String(), fmt.Sprint(ta.Port)
			break
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nrlsproxy dev is running.\n  proxy:    %s:%s\n  issuer:   %s (JWKS at /.well-known/jwks.json)\n  upstream: %s\n\n", host, port, issuerURL, upstream)
	b.WriteString("Table notes has the seed article's policy, user_id = current_setting('jwt.claims.sub');\n" +
		"table todos the recommended one, user_id = (SELECT auth.user_id()), which verifies the claims' signature.\n\n")
	for _, sub := range []string{"user1", "user2"} {
		fmt.Fprintf(&b, "As %s (sees only %s's rows):\n  PGPASSWORD='%s' psql \"host=%s port=%s dbname=%s user=%s sslmode=disable\" -c 'SELECT * FROM notes' -c 'SELECT * FROM todos'\n\n",
			sub, sub, tokens[sub], host, port, demo.Database, sub)
	}
	b.WriteString("More tokens: rlsproxy token --sub user1 [--groups g1,g2] [--ttl 1h]\nPress Ctrl-C to stop.\n")
	return b.String()
}
