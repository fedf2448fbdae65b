package main

import (
	"flag"
	"fmt"

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
	fmt.Print(sql)
	return nil
}
