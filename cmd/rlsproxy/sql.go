package main

import (
	"github.com/rlsproxy/rlsproxy/internal/dbsetup"

	"flag"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/session"
)

// cmdSQL prints the bootstrap SQL for the roles and settings the proxy's
// flags name.
func cmdSQL(args []string) error {
	fs := flag.NewFlagSet("rlsproxy sql", flag.ContinueOnError)
	var o serveOptions
	o.register(fs)
	harden := fs.Bool("harden", false, "include the hardening section (revoke TEMP, plpgsql, set_config, backend termination, pg_stat_activity)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	policy, err := o.policy()
	if err != nil {
		return err
	}
	opts := dbsetup.BootstrapOptions{Policy: policy, Leeway: o.leeway, Harden: *harden}
	if o.upstream != "" {
		cfg, err := pgconn.ParseConfig(o.upstream)
		if err != nil {
			return fmt.Errorf("--upstream: %w", err)
		}
		opts.Login, opts.Database = cfg.User, cfg.Database
	}
	if o.signingKeyFile != "" {
		if opts.Signer, err = session.LoadSigner(o.signingKeyFile); err != nil {
			return err
		}
	}
	sql, err := dbsetup.BootstrapSQL(opts)
	if err != nil {
		return err
	}
	fmt.Print(sql)
	return nil
}
