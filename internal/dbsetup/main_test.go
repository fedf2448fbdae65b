package dbsetup_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

// The cluster every test of the package talks to, holding the demo database.
var (
	upstream string
	cluster  *pgtemp.Cluster
)

func TestMain(m *testing.M) {
	ctx := context.Background()
	c, err := pgtemp.Start(ctx, pgtemp.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cluster = c
	upstream, err = demo.Setup(ctx, c)
	code := 1
	if err == nil {
		code = m.Run()
	} else {
		fmt.Fprintln(os.Stderr, err)
	}
	c.Stop()
	os.Exit(code)
}
