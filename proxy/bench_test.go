package proxy_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// BenchmarkRoundTrip measures one prepared-statement round trip through the
// proxy and directly, in one process (the pgx client runs here too).
//
//	go test -run '^$' -bench RoundTrip -cpuprofile cpu.out ./proxy/
func BenchmarkRoundTrip(b *testing.B) {
	ctx := context.Background()
	p := proxytest.Start(b, pg)
	for _, tc := range []struct{ name, dsn string }{
		{"direct", pg.SuperDSN("app")},
		{"proxy", p.DSN("user1", p.Token(b, "user1"))},
	} {
		b.Run(tc.name, func(b *testing.B) {
			conn, err := pgx.Connect(ctx, tc.dsn)
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close(ctx)
			var n int
			for b.Loop() {
				if err := conn.QueryRow(ctx, "SELECT 1").Scan(&n); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkConnect measures connect, one query, disconnect: direct (SCRAM,
// a new backend each time) and through the proxy (cached token, pooled
// upstream connection).
func BenchmarkConnect(b *testing.B) {
	ctx := context.Background()
	p := proxytest.Start(b, pg, proxytest.Pooled(8, 0))
	for _, tc := range []struct{ name, dsn string }{
		{"direct", pg.Upstream},
		{"proxy", p.DSN("user1", p.Token(b, "user1"))},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				conn, err := pgx.Connect(ctx, tc.dsn)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := conn.Exec(ctx, "SELECT 1"); err != nil {
					b.Fatal(err)
				}
				conn.Close(ctx)
			}
		})
	}
}
