// Package lru is a bounded map that forgets its least recently used
// entries: the token cache (auth) and the guard's verdict cache use it.
package lru

import (
	"container/list"
	"sync"
)

// Cache maps keys to values, holding at most its size of them. It is safe
// for concurrent use.
type Cache[K comparable, V any] struct {
	mu    sync.Mutex
	m     map[K]*list.Element
	order *list.List // most recently used first
	max   int
}

type entry[K comparable, V any] struct {
	key K
	val V
}

// New returns a cache of up to size entries; with size 0 or less it holds
// none.
func New[K comparable, V any](size int) *Cache[K, V] {
	return &Cache[K, V]{m: map[K]*list.Element{}, order: list.New(), max: size}
}

// Get returns the value of key, and makes it the most recently used.
func (c *Cache[K, V]) Get(key K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		var zero V
		return zero, false
	}
	c.order.MoveToFront(e)
	return e.Value.(*entry[K, V]).val, true
}

// Add sets key's value unless key is there already, forgetting the least
// recently used entry if the cache is full.
func (c *Cache[K, V]) Add(key K, val V) {
	if c.max <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[key]; ok {
		return
	}
	c.m[key] = c.order.PushFront(&entry[K, V]{key, val})
	if c.order.Len() > c.max {
		old := c.order.Remove(c.order.Back()).(*entry[K, V])
		delete(c.m, old.key)
	}
}

// Remove forgets key.
func (c *Cache[K, V]) Remove(key K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[key]; ok {
		c.order.Remove(e)
		delete(c.m, key)
	}
}

// Len is the number of entries held.
func (c *Cache[K, V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}
