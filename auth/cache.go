package auth

import (
	"crypto/sha256"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/lru"
)

// tokenCache remembers verified tokens until they expire, so that a storm of
// reconnects with the same token skips signature verification. It is keyed
// by a hash of the token: the cache never holds a token itself.
type tokenCache struct {
	ids *lru.Cache[[sha256.Size]byte, *Identity]
}

func newTokenCache(size int) *tokenCache {
	return &tokenCache{ids: lru.New[[sha256.Size]byte, *Identity](size)}
}

// get returns the identity of a token verified earlier, while it is valid at now.
func (c *tokenCache) get(key [sha256.Size]byte, now time.Time, leeway time.Duration) *Identity {
	id, ok := c.ids.Get(key)
	if !ok {
		return nil
	}
	if now.After(id.ExpiresAt.Add(leeway)) {
		c.ids.Remove(key)
		return nil
	}
	return id
}

func (c *tokenCache) put(key [sha256.Size]byte, id *Identity) { c.ids.Add(key, id) }
