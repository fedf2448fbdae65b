package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/dbsetup"
)

// errFindings means `rlsproxy check` printed at least one problem: main
// exits with status 1, without another message, so scripts and CI can tell
// "the database has gaps" (1) from "the check could not run" (2).
var errFindings = errors.New("rlsproxy check found problems")

// checkTimeout bounds the whole check, so a database that hangs does not
// hang a CI job.
const checkTimeout = 2 * time.Minute

// cmdCheck connects with the --upstream credentials and reports what in the
// database would weaken row-level security through the proxy.
func cmdCheck(args []string) error { return checkTo(os.Stdout, args) }

// checkTo is cmdCheck writing its report to w.
func checkTo(w io.Writer, args []string) error {
	fs := flag.NewFlagSet("rlsproxy check", flag.ContinueOnError)
	var o checkOptions
	o.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	opts, err := o.config()
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	conn, err := opts.Connect(ctx)
	if err != nil {
		return fmt.Errorf("connecting to --upstream: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	findings, err := dbsetup.Check(ctx, conn, opts)
	if err != nil {
		return err
	}
	return report(w, findings)
}

// report prints problems first, then warnings, each with its fix, and a
// summary line; it returns errFindings when there is a problem.
func report(w io.Writer, findings []dbsetup.Finding) error {
	var problems, warnings int
	for _, sev := range []string{dbsetup.SeverityProblem, dbsetup.SeverityWarning} {
		for _, f := range findings {
			if f.Severity != sev {
				continue
			}
			label := "WARNING"
			if sev == dbsetup.SeverityProblem {
				label = "PROBLEM"
				problems++
			} else {
				warnings++
			}
			fmt.Fprintf(w, "%-8s %s\n", label, f.Message)
			if f.Fix != "" {
				fmt.Fprintf(w, "%-8s fix: %s\n", "", f.Fix)
			}
		}
	}
	var summary []string
	if problems == 0 {
		summary = append(summary, "no problems found")
	} else {
		summary = append(summary, plural(problems, "problem"))
	}
	if warnings > 0 {
		summary = append(summary, plural(warnings, "warning"))
	}
	fmt.Fprintln(w, strings.Join(summary, ", "))
	if problems > 0 {
		return errFindings
	}
	return nil
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}
