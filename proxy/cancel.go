package proxy

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"sync"
	"time"
)

// cancelKey is the BackendKeyData the proxy gives a client. It is the proxy's
// own, not the upstream's: the upstream key never leaves the proxy, and a
// client can cancel only its own session's queries.
type cancelKey struct {
	pid    uint32
	secret [4]byte
}

// canceler cancels the running query of one session.
type canceler interface {
	Cancel(ctx context.Context) error
}

// cancelRegistry routes CancelRequests to sessions. Entries live as long as
// their session.
type cancelRegistry struct {
	mu sync.Mutex
	m  map[uint32]cancelEntry
}

type cancelEntry struct {
	secret [4]byte
	target canceler
	// inflight counts cancels under way, which unregister waits for: a
	// cancel sent after the connection went back to the pool would reach
	// the next session's statement.
	inflight *sync.WaitGroup
}

func newCancelRegistry() *cancelRegistry {
	return &cancelRegistry{m: make(map[uint32]cancelEntry)}
}

// register issues a fresh key for target.
func (c *cancelRegistry) register(target canceler) cancelKey {
	var k cancelKey
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		var b [8]byte
		_, _ = rand.Read(b[:])
		// Backend pids are positive int32s; some clients store them so.
		k.pid = binary.BigEndian.Uint32(b[:4]) & 0x7fffffff
		copy(k.secret[:], b[4:])
		if _, taken := c.m[k.pid]; !taken && k.pid != 0 {
			c.m[k.pid] = cancelEntry{secret: k.secret, target: target, inflight: &sync.WaitGroup{}}
			return k
		}
	}
}

// unregister forgets a key, once the cancels already under way for it have
// been delivered: no later cancel can reach the session's connection.
func (c *cancelRegistry) unregister(k cancelKey) {
	c.mu.Lock()
	e, ok := c.m[k.pid]
	delete(c.m, k.pid)
	c.mu.Unlock()
	if ok {
		e.inflight.Wait()
	}
}

// cancel forwards a CancelRequest to the session holding the key. Unknown
// keys are ignored, as PostgreSQL does: the requester learns nothing.
func (c *cancelRegistry) cancel(ctx context.Context, pid uint32, secret []byte) bool {
	c.mu.Lock()
	e, ok := c.m[pid]
	if ok && subtle.ConstantTimeCompare(e.secret[:], secret) == 1 {
		e.inflight.Add(1)
	} else {
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return false
	}
	defer e.inflight.Done()
	ctx, done := context.WithTimeout(ctx, 5*time.Second)
	defer done()
	return e.target.Cancel(ctx) == nil
}
