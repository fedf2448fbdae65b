package proxy_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// BenchmarkRoundTrip measures one round trip (a prepared statement, and a
// simple-protocol Query, which the guard reads) directly and through the
// proxy: on its event loop with the guard on and off, and relayed by a
// goroutine per direction. All in one process (the pgx client runs here
// too), so the differences are what counts, not the totals.
//
//	go test -run '^$' -bench RoundTrip -count 5 ./proxy/
func BenchmarkRoundTrip(b *testing.B) {
	ctx := context.Background()
	loop := proxytest.Start(b, pg, proxytest.RelayLoops(1))
	guardOff := proxytest.Start(b, pg, proxytest.RelayLoops(1), proxytest.GuardOff)
	goroutines := proxytest.Start(b, pg, proxytest.GoroutineRelay)
	for _, tc := range []struct{ name, dsn string }{
		{"direct", pg.SuperDSN("app")},
		{"loop", loop.DSN("user1", loop.Token(b, "user1"))},
		{"loop-guard-off", guardOff.DSN("user1", guardOff.Token(b, "user1"))},
		{"goroutines", goroutines.DSN("user1", goroutines.Token(b, "user1"))},
	} {
		for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeSimpleProtocol} {
			b.Run(tc.name+"/"+map[pgx.QueryExecMode]string{pgx.QueryExecModeCacheStatement: "prepared", pgx.QueryExecModeSimpleProtocol: "simple"}[mode], func(b *testing.B) {
				cfg, err := pgx.ParseConfig(tc.dsn)
				if err != nil {
					b.Fatal(err)
				}
				cfg.DefaultQueryExecMode = mode
				conn, err := pgx.ConnectConfig(ctx, cfg)
				if err != nil {
					b.Fatal(err)
				}
				defer conn.Close(ctx)
				var n int
				for b.Loop() {
					if err := conn.QueryRow(ctx, "SELECT count(*) FROM notes WHERE id > $1", 0).Scan(&n); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
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
