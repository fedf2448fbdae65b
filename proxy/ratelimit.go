package proxy

import (
	"github.com/rlsproxy/rlsproxy/internal/loopback"

	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// authLimiter bounds failed authentications per client address: each
// address may fail burst times, then once per interval. A flood of bad
// tokens so costs the proxy a map lookup per connection, not a signature
// check. Loopback and unix-socket peers are not limited: they are the
// sidecar's application, and one buggy client there must not lock out all
// others.
type authLimiter struct {
	every time.Duration
	burst int

	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// maxTracked bounds the addresses tracked; beyond it, addresses whose
// allowance is full again are forgotten.
const maxTracked = 10000

func newAuthLimiter(every time.Duration, burst int) *authLimiter {
	return &authLimiter{every: every, burst: burst, m: map[string]*rate.Limiter{}}
}

// allowed reports whether addr may try to authenticate now, and if not,
// how long until it may.
func (l *authLimiter) allowed(addr net.Addr) (bool, time.Duration) {
	key, ok := limitKey(addr)
	if !ok {
		return true, 0
	}
	l.mu.Lock()
	lim := l.m[key]
	l.mu.Unlock()
	if lim == nil {
		return true, 0
	}
	// Only a failure consumes the allowance: here it is only read.
	if t := lim.Tokens(); t < 1 {
		return false, time.Duration((1 - t) * float64(l.every))
	}
	return true, 0
}

// failed records a failed authentication from addr.
func (l *authLimiter) failed(addr net.Addr) {
	key, ok := limitKey(addr)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.m[key]
	if lim == nil {
		if len(l.m) >= maxTracked {
			for k, v := range l.m {
				if v.Tokens() >= float64(l.burst) {
					delete(l.m, k)
				}
			}
		}
		lim = rate.NewLimiter(rate.Every(l.every), l.burst)
		l.m[key] = lim
	}
	lim.Allow()
}

func limitKey(addr net.Addr) (string, bool) {
	ta, ok := addr.(*net.TCPAddr)
	if !ok || loopback.Addr(addr) {
		return "", false
	}
	return ta.IP.String(), true
}
