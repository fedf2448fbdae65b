// Package demo creates the demo database of `rlsproxy dev` (and of the
// tests): the seed article's notes table with its RLS policy, and the roles
// the proxy needs; and, for `rlsproxy dev`, the recommended setup on top of
// it, with a table whose policy reads auth.user_id().
package demo

import (
	"context"
	"crypto/rand"
	_ "embed"
	"strings"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
	"github.com/rlsproxy/rlsproxy/session"
)

//go:embed schema.sql
var schema string

//go:embed signed.sql
var signed string

// Database is the name of the demo database.
const Database = "app"

// Login is the service login of the demo database.
const Login = "authenticator"

// Setup creates database "app" holding the demo schema on c and returns the
// upstream URL of the service login role "authenticator".
func Setup(ctx context.Context, c *pgtemp.Cluster) (string, error) {
	if err := c.Exec(ctx, "postgres", "CREATE DATABASE "+Database); err != nil {
		return "", err
	}
	password := rand.Text()
	sql := strings.ReplaceAll(schema, ":'password'", sqlquote.Literal(password))
	if err := c.Exec(ctx, Database, sql); err != nil {
		return "", err
	}
	return c.URL(Login, password, Database), nil
}

// Recommended runs on the demo database what `rlsproxy sql
// --signing-key-file` prints for policy (one login per mapped role, the
// claims' key, the auth schema), then creates table todos, whose policy
// reads auth.user_id(). The seed's notes table keeps its current_setting
// policy: the demo shows both.
func Recommended(ctx context.Context, c *pgtemp.Cluster, signer *session.Signer, policy session.Policy, leeway time.Duration) error {
	sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: policy, Login: Login, Database: Database,
		Signer: signer, Leeway: leeway})
	if err != nil {
		return err
	}
	if err := c.Exec(ctx, Database, sql); err != nil {
		return err
	}
	return c.Exec(ctx, Database, signed)
}
