package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"
)

// cmdSQL prints the bootstrap SQL for the roles and settings the proxy's
// flags name.
func cmdSQL(args []string) error {
	fs := flag.NewFlagSet("rlsproxy sql", flag.ContinueOnError)
	var o sqlOptions
	o.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	opts, err := o.config()
	if err != nil {
		return err
	}
	sql, err := dbsetup.BootstrapSQL(opts)
	if err != nil {
		return err
	}
	if opts.Signer == nil {
		// The SQL says so too, but it usually goes straight to a file.
		fmt.Fprintln(os.Stderr, "rlsproxy sql: no --signing-key-file: this is the earlier setup, where only the guard keeps sessions in their roles and claims are unsigned; recommended: openssl rand -hex 32 > signing.key, then rlsproxy sql ... --signing-key-file signing.key")
	}
	fmt.Print(sql)
	return nil
}
