package proxy_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// A full database (here: the login's connection limit reached, which
// PostgreSQL refuses with 53300 as it does past max_connections) leaves the
// proxy ready while a pooled connection answers, and a client that needs a
// new upstream connection gets the server's 53300, to retry, not 08001.
func TestReadyAndFullDatabase(t *testing.T) {
	p := proxytest.Start(t, pg, proxytest.Pooled(2, 0), proxytest.SessionPooling)
	ctx := context.Background()
	first := connect(t, p, "user1", p.Token(t, "user1"))
	first.Close(ctx) // its connection waits in the pool

	r10Super(t, "ALTER ROLE authenticator CONNECTION LIMIT 0")
	t.Cleanup(func() { _, _ = superConn(t).Exec(ctx, "ALTER ROLE authenticator CONNECTION LIMIT -1") })

	admin := httptest.NewServer(p.Server.AdminHandler(prometheus.NewRegistry(), false))
	defer admin.Close()
	resp, err := http.Get(admin.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz answered %s with the database full and a pooled connection that works", resp.Status)
	}

	holder := connect(t, p, "user1", p.Token(t, "user1")) // takes the pooled connection
	defer holder.Close(ctx)
	_, err = pgx.Connect(ctx, p.DSN("user2", p.Token(t, "user2")))
	if err == nil {
		t.Fatal("a new upstream connection was opened past the limit")
	}
	if pgErr := asPgError(err); pgErr == nil || pgErr.Code != "53300" {
		t.Fatalf("a client refused by a full database got %v, want SQLSTATE 53300", err)
	}
}

func asPgError(err error) *pgconn.PgError {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr
	}
	return nil
}

// Failed logins are logged at most once a minute per address and reason,
// with the count refused since: 50 bad tokens cost one line.
func TestRefusalsLoggedOnce(t *testing.T) {
	p := proxytest.Start(t, pg)
	for range 50 {
		connectErr(t, p.DSN("user1", "not-a-token"))
	}
	if n := strings.Count(p.Logs(), `msg="connection refused"`); n != 1 {
		t.Errorf("%d lines for 50 refused logins, want 1", n)
	}
}

// A client that starts a message and stops is disconnected after
// FrameTimeout (it was kept forever); one idle past ClientIdleTimeout is
// told so (57P05), while an active one is not; both with either driver.
func TestClientTimeouts(t *testing.T) {
	for _, d := range relayDrivers {
		t.Run(d.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, d.opt, func(s *proxytest.Setup) {
				s.FrameTimeout = time.Second
				s.ClientIdleTimeout = 2 * time.Second
			})
			half := rawSession(t, p, "user1")
			// The header of a 100-byte Query, and 3 bytes of it.
			if _, err := half.Write([]byte{'Q', 0, 0, 0, 100, 'S', 'E', 'L'}); err != nil {
				t.Fatal(err)
			}
			idle := rawSession(t, p, "user2")
			active := connect(t, p, "user3", p.Token(t, "user3"))
			deadline := time.Now().Add(3500 * time.Millisecond)
			for time.Now().Before(deadline) {
				if _, err := active.Exec(context.Background(), "SELECT 1"); err != nil {
					t.Fatalf("an active client was disconnected: %v", err)
				}
				time.Sleep(300 * time.Millisecond)
			}
			for _, tc := range []struct {
				c    *rawClient
				code string
			}{{half, "08P01"}, {idle, "57P05"}} {
				_ = tc.c.SetReadDeadline(time.Now().Add(3 * time.Second))
				m, err := tc.c.fe.Receive()
				if e, ok := m.(*pgproto3.ErrorResponse); err != nil || !ok || e.Severity != "FATAL" || e.Code != tc.code {
					t.Errorf("want FATAL %s, got %#v (%v)", tc.code, m, err)
				}
			}
		})
	}
}

// A reload's client limits apply to connections accepted after it: the
// sessions open stay, a client past the new bound gets 53300.
func TestSetClientLimits(t *testing.T) {
	p := proxytest.Start(t, pg)
	ctx := context.Background()
	first := connect(t, p, "user1", p.Token(t, "user1"))
	defer first.Close(ctx)
	p.Server.SetClientLimits(1, 5*time.Second)
	_, err := pgx.Connect(ctx, p.DSN("user2", p.Token(t, "user2")))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "53300" {
		t.Fatalf("a second client past --max-client-conns 1: %v, want 53300", err)
	}
	if _, err := first.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("the open session after the new limit: %v", err)
	}
	p.Server.SetClientLimits(10, 5*time.Second)
	second := connect(t, p, "user2", p.Token(t, "user2"))
	second.Close(ctx)
}
