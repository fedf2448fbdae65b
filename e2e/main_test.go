// Package e2e runs real PostgreSQL clients (JDBC, psycopg2, psycopg 3,
// SQLAlchemy, node-postgres, pgbench) through rlsproxy against a real
// PostgreSQL holding the demo schema, and checks that Row-Level Security sees
// the identity of each client's token.
package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

// pg is the cluster every test of the package shares; each test starts its
// own proxy in front of it.
var pg *proxytest.Postgres

// signer is the signing key the database was set up with (rlsproxy sql
// --signing-key-file): with it, sessions of each mapped role log in as that
// role's own login and their claims are signed.
var signer *session.Signer

func TestMain(m *testing.M) {
	proxytest.Main(m, func(p *proxytest.Postgres) error {
		pg = p
		var err error
		if signer, err = session.NewSigner([]byte("e2e-signing-key-0123456789abcdef0123")); err != nil {
			return err
		}
		// The recommended setup, with Transition: the service login stays
		// a member of the mapped roles, so the tests of today's unsigned
		// setup run on the same database.
		sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: proxytest.DefaultPolicy(),
			Login: "authenticator", Database: "app", Signer: signer, Leeway: 5 * time.Second, Transition: true})
		if err != nil {
			return err
		}
		return p.Exec(context.Background(), "app", sql)
	})
}

// recommended runs a proxy as `rlsproxy serve --signing-key-file` does: one
// login per mapped role, signed claims.
func recommended(s *proxytest.Setup) { s.Signer = signer }
