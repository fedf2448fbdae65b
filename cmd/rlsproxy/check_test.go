package main

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

// rlsproxy check against the demo database: before the bootstrap SQL it
// reports the missing auth schema and exits with errFindings; after running
// what `rlsproxy sql` prints it finds no problem (only the warnings the
// optional hardening would close) and proves the signing key round trip.
func TestCheckCommand(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cluster, err := pgtemp.Start(ctx, pgtemp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Stop()
	url, err := demo.Setup(ctx, cluster)
	if err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(key, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--upstream", url, "--signing-key-file", key}

	var out strings.Builder
	if err := checkTo(&out, args); !errors.Is(err, errFindings) {
		t.Fatalf("before the bootstrap SQL: %v, want errFindings\n%s", err, &out)
	}
	if !strings.Contains(out.String(), "PROBLEM  schema auth does not exist") ||
		!strings.Contains(out.String(), "\n         fix: rlsproxy sql <the proxy's --upstream, role and claim flags, --signing-key-file included>") ||
		!strings.Contains(out.String(), "2 problems, ") {
		t.Fatalf("before the bootstrap SQL:\n%s", &out)
	}

	sql, err := captureStdout(t, func() error { return run(append([]string{"sql"}, args...)) })
	if err != nil {
		t.Fatal(err)
	}
	if err := cluster.Exec(ctx, demo.Database, sql); err != nil {
		t.Fatalf("bootstrap SQL: %v", err)
	}
	report, err := captureStdout(t, func() error { return run(append([]string{"check"}, args...)) })
	if err != nil {
		t.Fatalf("after the bootstrap SQL: %v\n%s", err, report)
	}
	// Not hardened: TEMP, plpgsql, set_config, backend signals and
	// pg_stat_activity remain open to PUBLIC, as warnings; and the seed's
	// policy reads a claim setting the database does not verify.
	if strings.Contains(report, "PROBLEM") || !strings.Contains(report, "no problems found, 6 warnings") ||
		!strings.Contains(report, "WARNING  role authenticated may execute set_config()") ||
		!strings.Contains(report, "WARNING  policy notes_owner on table public.notes reads jwt.claims.sub with current_setting()") {
		t.Fatalf("after the bootstrap SQL:\n%s", report)
	}

	// A key other than the provisioned one is caught by the round trip.
	other := filepath.Join(t.TempDir(), "other")
	if err := os.WriteFile(other, []byte(strings.Repeat("cd", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err = checkTo(&out, []string{"--upstream", url, "--signing-key-file", other})
	if !errors.Is(err, errFindings) || !strings.Contains(out.String(), "does not match --signing-key-file") {
		t.Fatalf("another key: %v\n%s", err, &out)
	}
}

// captureStdout runs fn with os.Stdout redirected and returns what it wrote.
func captureStdout(t *testing.T, fn func() error) (string, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stdout
	os.Stdout = w
	done := make(chan string)
	go func() {
		b, _ := io.ReadAll(r)
		r.Close()
		done <- string(b)
	}()
	err = fn()
	os.Stdout = saved
	w.Close()
	return <-done, err
}
