// Package e2e runs real PostgreSQL clients (JDBC, psycopg2, psycopg 3,
// SQLAlchemy, node-postgres, pgbench) through rlsproxy against a real
// PostgreSQL holding the demo schema, and checks that Row-Level Security sees
// the identity of each client's token.
package e2e

import (
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// pg is the cluster every test of the package shares; each test starts its
// own proxy in front of it.
var pg *proxytest.Postgres

func TestMain(m *testing.M) {
	proxytest.Main(m, func(p *proxytest.Postgres) error {
		pg = p
		return nil
	})
}
