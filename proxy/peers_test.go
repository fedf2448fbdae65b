package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/proxytest"
	"github.com/rlsproxy/rlsproxy/proxy"
)

// balancer is a round-robin TCP balancer in front of several instances:
// connection n goes to backend n mod len(backends), as a Kubernetes Service
// or a cloud load balancer may send a client's CancelRequest elsewhere than
// its session.
type balancer struct {
	host     string
	port     int
	backends []string
	next     atomic.Int64
}

func newBalancer(t *testing.T, backends []string) *balancer {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	a := l.Addr().(*net.TCPAddr)
	b := &balancer{host: a.IP.String(), port: a.Port, backends: backends}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			to := b.backends[int(b.next.Add(1)-1)%len(b.backends)]
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", to)
				if err != nil {
					return
				}
				defer u.Close()
				go func() {
					_, _ = io.Copy(u, c)
					_ = u.(*net.TCPConn).CloseWrite()
				}()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return b
}

// nextIndex is the backend the next connection goes to.
func (b *balancer) nextIndex() int { return int(b.next.Load()) % len(b.backends) }

// Three instances on three loopback addresses behind a round-robin
// balancer: each session's CancelRequest lands on another instance than the
// session, which forwards it to its peers; it reaches the right session
// every time, and cancels nothing else.
func TestCancelThroughPeers(t *testing.T) {
	const n = 3
	var listeners []net.Listener
	var addrs []string
	for i := range n {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:0", i+1))
		if err != nil {
			t.Fatal(err)
		}
		listeners = append(listeners, l)
		addrs = append(addrs, l.Addr().String())
	}
	var instances []*proxytest.Proxy
	for i := range n {
		instances = append(instances, proxytest.StartListener(t, pg, listeners[i], func(s *proxytest.Setup) {
			s.Peers = addrs // itself included, as a headless Service's name resolves
			s.InsecurePlaintext = true
		}))
	}
	ctx := context.Background()
	lb := newBalancer(t, addrs)
	for round := range 2 * n {
		at := lb.nextIndex()
		inst := instances[at]
		dsn := fmt.Sprintf("host=%s port=%d dbname=app user=user1 sslmode=disable password=%s", lb.host, lb.port, inst.Token(t, "user1"))
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatalf("round %d: connect through the balancer to instance %d: %v", round, at, err)
		}
		// Another session, on the next instance, must not be cancelled.
		otherAt := lb.nextIndex()
		other, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d dbname=app user=user2 sslmode=disable password=%s", lb.host, lb.port, instances[otherAt].Token(t, "user2")))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { _, err := conn.Exec(ctx, "SELECT pg_sleep(30)"); done <- err }()
		otherDone := make(chan error, 1)
		go func() { _, err := other.Exec(ctx, "SELECT pg_sleep(1)"); otherDone <- err }()
		time.Sleep(200 * time.Millisecond)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := conn.PgConn().CancelRequest(cctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		select {
		case err := <-done:
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
				t.Fatalf("round %d (session on instance %d): %v, want 57014", round, at, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: the cancel sent through the balancer never reached the session on instance %d", round, at)
		}
		if err := <-otherDone; err != nil {
			t.Fatalf("round %d: another session was cancelled: %v", round, err)
		}
		conn.Close(ctx)
		other.Close(ctx)
	}
	var toPeers float64
	for _, inst := range instances {
		toPeers += inst.Counter(t, "rlsproxy_cancel_requests_to_peers_total")
	}
	if toPeers < 2*n {
		t.Errorf("%v cancels forwarded to peers, want at least %d", toPeers, 2*n)
	}
}

// Two processes' listeners share a port with SO_REUSEPORT.
func TestReusePort(t *testing.T) {
	a, err := proxy.ListenReusePort("127.0.0.1:0", true)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := proxy.ListenReusePort(a.Addr().String(), true)
	if err != nil {
		t.Fatalf("a second listener on %s: %v", a.Addr(), err)
	}
	b.Close()
	if c, err := proxy.ListenReusePort(a.Addr().String(), false); err == nil {
		c.Close()
		t.Fatal("without SO_REUSEPORT the port was shared")
	}
}
