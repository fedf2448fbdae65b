// Package demo creates the demo database of `rlsproxy dev` (and of the
// tests): the seed article's notes table with its RLS policy, and the roles
// the proxy needs.
package demo

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"context"
	"crypto/rand"
	_ "embed"
	"strings"

	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

//go:embed schema.sql
var schema string

// Database is the name of the demo database.
const Database = "app"

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
	return c.URL("authenticator", password, Database), nil
}
