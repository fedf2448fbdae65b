package proxy_test

// Transaction pooling (txpool.go): identity exact in every transaction,
// prepared statements that follow their client, session state pinned, and
// the rest of the session's meaning kept.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/session"
)

// txPooled is transaction pooling over size upstream connections, with a
// pool wait long enough for many clients to queue.
func txPooled(size int) proxytest.Option {
	return func(s *proxytest.Setup) {
		proxytest.TransactionPooling(s)
		s.PoolConfig = session.PoolConfig{Size: size, MaxConns: size, WaitTimeout: 60 * time.Second}
	}
}

// txUsers gives each of n users one row of signed_notes and of notes, which
// their policies show them alone.
func txUsers(t *testing.T, n int) []string {
	t.Helper()
	var users []string
	var values []string
	for i := range n {
		u := fmt.Sprintf("tx-user-%02d", i)
		users = append(users, u)
		values = append(values, fmt.Sprintf("('%s', 'row of %s')", u, u))
	}
	r10Super(t, "INSERT INTO signed_notes (user_id, content) VALUES "+strings.Join(values, ", ")+
		"; INSERT INTO notes (user_id, content) VALUES "+strings.Join(values, ", "))
	t.Cleanup(func() {
		_, _ = superConn(t).Exec(context.Background(), "DELETE FROM signed_notes WHERE user_id LIKE 'tx-user-%'; DELETE FROM notes WHERE user_id LIKE 'tx-user-%'")
	})
	return users
}

// The proof: 200 clients of 50 users over 5 upstream connections,
// randomly interleaved, at least 10,000 transactions, each asserting its
// role, its claim settings, auth.user_id() and the rows its policies show.
// Guard on, and guard off with signed claims.
func TestTxPoolingIdentityExact(t *testing.T) {
	const clients, users, conns, perClient = 200, 50, 5, 50
	names := txUsers(t, users)
	for _, mode := range []struct {
		name string
		opts []proxytest.Option
	}{
		{"guard on", []proxytest.Option{withSigner}},
		{"guard off, signed claims", []proxytest.Option{withSigner, proxytest.GuardOff}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, append([]proxytest.Option{txPooled(conns)}, mode.opts...)...)
			var done, mismatches atomic.Int64
			var firstErr sync.Once
			fail := func(format string, args ...any) {
				mismatches.Add(1)
				firstErr.Do(func() { t.Errorf(format, args...) })
			}
			var wg sync.WaitGroup
			for c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					user := names[c%users]
					ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
					defer cancel()
					cfg, err := pgx.ParseConfig(p.DSN(user, p.Token(t, user)))
					if err != nil {
						fail("%v", err)
						return
					}
					if c%4 == 1 {
						cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
					}
					conn, err := pgx.ConnectConfig(ctx, cfg)
					if err != nil {
						fail("client %d connect: %v", c, err)
						return
					}
					defer conn.Close(context.Background())
					rng := rand.New(rand.NewPCG(uint64(c), 11))
					for range perClient {
						if err := txCheck(ctx, conn, user, rng.IntN(3)); err != nil {
							fail("client %d (%s): %v", c, user, err)
						}
						done.Add(1)
						if rng.IntN(4) == 0 {
							time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
						}
					}
				}()
			}
			wg.Wait()
			st := p.Config.Pool.Snapshot()
			t.Logf("%d transactions, %d mismatches; upstream connections opened %d, discarded %d; installs %d, same-identity hits %d (%.0f%%)",
				done.Load(), mismatches.Load(), st.Opened, st.Discarded, st.Installs, st.IdentityHits,
				100*float64(st.IdentityHits)/float64(max(1, st.IdentityHits+st.Installs)))
			if done.Load() < clients*perClient || mismatches.Load() != 0 {
				t.Fatalf("%d transactions, %d mismatches", done.Load(), mismatches.Load())
			}
			if st.Opened > conns {
				t.Errorf("opened %d upstream connections, want at most %d", st.Opened, conns)
			}
			if st.Installs == 0 {
				t.Error("no transaction needed an install: the test interleaves nothing")
			}
		})
	}
}

// txCheck runs one transaction, of one of three shapes, and checks that it
// ran as user.
func txCheck(ctx context.Context, conn *pgx.Conn, user string, shape int) error {
	const q = `SELECT current_user::text, current_setting('jwt.claims.sub'), auth.user_id(),
		(current_setting('request.jwt.claims')::jsonb ->> 'sub'),
		(SELECT string_agg(content, ',') FROM signed_notes),
		(SELECT string_agg(content, ',') FROM notes)`
	var role, sub, uid, claimsSub, signedRows, rows string
	scan := func(r pgx.Row) error {
		return r.Scan(&role, &sub, &uid, &claimsSub, &signedRows, &rows)
	}
	var err error
	switch shape {
	case 0: // one statement, autocommit
		err = scan(conn.QueryRow(ctx, q))
	case 1: // an explicit transaction of several statements
		var tx pgx.Tx
		if tx, err = conn.Begin(ctx); err == nil {
			if _, err = tx.Exec(ctx, "SELECT 1"); err == nil {
				err = scan(tx.QueryRow(ctx, q))
			}
			if err == nil {
				err = tx.Commit(ctx)
			} else {
				_ = tx.Rollback(ctx)
			}
		}
	case 2: // a batch: several statements in one pipeline
		b := &pgx.Batch{}
		b.Queue("SELECT 1")
		b.Queue(q).QueryRow(func(r pgx.Row) error { return scan(r) })
		err = conn.SendBatch(ctx, b).Close()
	}
	if err != nil {
		return err
	}
	want := "row of " + user
	if role != "authenticated" || sub != user || uid != user || claimsSub != user || signedRows != want || rows != want {
		return fmt.Errorf("shape %d ran as role %s sub %s auth.user_id() %s claims.sub %s, saw signed_notes %q notes %q",
			shape, role, sub, uid, claimsSub, signedRows, rows)
	}
	return nil
}

