package proxy_test

import (
	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"context"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

// pg is the PostgreSQL cluster every test in this package talks to.
var pg *proxytest.Postgres

// signer signs claims in the tests of the signed-claims layer; the database
// holds its key through the bootstrap SQL.
var signer *session.Signer

func TestMain(m *testing.M) {
	proxytest.Main(m, func(p *proxytest.Postgres) error {
		pg = p
		ctx := context.Background()
		if err := p.Exec(ctx, "app", `
			CREATE ROLE admin NOLOGIN;
			CREATE ROLE anon NOLOGIN;
			CREATE ROLE editor NOLOGIN;
			GRANT admin, anon, editor TO authenticator;
			GRANT SELECT ON notes TO anon, admin;
			CREATE POLICY notes_admin ON notes TO admin USING (true);
			CREATE ROLE outsider NOLOGIN;`); err != nil {
			return err
		}
		var err error
		if signer, err = session.NewSigner([]byte("proxy-test-signing-key-0123456789abcdef")); err != nil {
			return err
		}
		// Every role a test maps gets its own login, for the tests that
		// sign; Transition keeps authenticator a member of them all, for
		// the tests that do not (today's setup, unsigned).
		roles := proxytest.DefaultPolicy()
		roles.RoleMap = []session.RoleRule{{Group: "admins", Role: "admin"}, {Group: "editors", Role: "editor"}}
		roles.AnonymousRole = "anon"
		sql, err := dbsetup.BootstrapSQL(dbsetup.BootstrapOptions{Policy: roles,
			Login: "authenticator", Database: "app", Signer: signer, Leeway: 5 * time.Second, Transition: true})
		if err != nil {
			return err
		}
		if err := p.Exec(ctx, "app", sql); err != nil {
			return err
		}
		// The signed-claims layer's table: its policy reads auth.user_id().
		return p.Exec(ctx, "app", `
			CREATE TABLE signed_notes (user_id text NOT NULL, content text NOT NULL);
			ALTER TABLE signed_notes ENABLE ROW LEVEL SECURITY;
			CREATE POLICY own ON signed_notes USING (user_id = (SELECT auth.user_id()));
			GRANT SELECT ON signed_notes TO authenticated;
			INSERT INTO signed_notes VALUES ('user1', 'signed: user1'), ('user2', 'signed: user2');`)
	})
}
