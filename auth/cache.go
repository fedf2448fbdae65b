package auth

import (
	"container/list"
	"crypto/sha256"
	"sync"
	"time"
)

// tokenCache remembers verified tokens until they expire, so that a storm of
// reconnects with the same token skips signature verification. It is keyed
// by a hash of the token: the cache never holds a token itself.
type tokenCache struct {
	mu  sync.Mutex
	m   map[[sha256.Size]byte]*list.Element
	lru *list.List
	max int
}

type cachedToken struct {
	key [sha256.Size]byte
	id  *Identity
}

func newTokenCache(size int) *tokenCache {
	return &tokenCache{m: map[[sha256.Size]byte]*list.Element{}, lru: list.New(), max: size}
}

// get returns the identity of a token verified earlier, while it is valid at now.
func (c *tokenCache) get(key [sha256.Size]byte, now time.Time, leeway time.Duration) *Identity {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return nil
	}
	ct := e.Value.(*cachedToken)
	if now.After(ct.id.ExpiresAt.Add(leeway)) {
		c.lru.Remove(e)
		delete(c.m, key)
		return nil
	}
	c.lru.MoveToFront(e)
	return ct.id
}

func (c *tokenCache) put(key [sha256.Size]byte, id *Identity) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[key]; ok {
		return
	}
	c.m[key] = c.lru.PushFront(&cachedToken{key, id})
	if c.lru.Len() > c.max {
		old := c.lru.Remove(c.lru.Back()).(*cachedToken)
		delete(c.m, old.key)
	}
}
