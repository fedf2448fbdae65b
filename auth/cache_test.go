package auth

import (
	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"context"
	"crypto/rand"
	"crypto/rsa"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// A verified token is answered from the cache until it expires; lookups are
// counted; the cache is bounded and never matches another token.
func TestTokenCache(t *testing.T) {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	iss, _ := devissuer.New("", key)
	srv := httptest.NewServer(iss)
	defer srv.Close()
	iss.URL = srv.URL
	now := time.Now()
	var hits, misses atomic.Int32
	v, err := New(context.Background(), Config{
		Rules: Rules{Issuer: srv.URL, ClientIDs: []string{devissuer.ClientID}}, CacheSize: 2,
		Now: func() time.Time { return now },
		OnCacheLookup: func(hit bool) {
			if hit {
				hits.Add(1)
			} else {
				misses.Add(1)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx := context.Background()
	mint := func(sub string, ttl time.Duration) string {
		tok, err := iss.Mint(devissuer.TokenRequest{Subject: sub, TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	a := mint("a", time.Minute)
	for range 3 {
		id, err := v.Verify(ctx, a)
		if err != nil || id.Subject != "a" {
			t.Fatal(id, err)
		}
	}
	if hits.Load() != 2 || misses.Load() != 1 {
		t.Fatalf("hits %d misses %d, want 2 and 1", hits.Load(), misses.Load())
	}
	// A tampered copy is a different key: verified, and refused.
	if _, err := v.Verify(ctx, a[:len(a)-2]+"AA"); err == nil {
		t.Fatal("a tampered token was accepted")
	}
	// Past exp the cached identity is refused.
	now = now.Add(2 * time.Minute)
	if _, err := v.Verify(ctx, a); err == nil {
		t.Fatal("an expired cached token was accepted")
	}
	// Bounded.
	now = time.Now()
	for _, s := range []string{"b", "c", "d"} {
		if _, err := v.Verify(ctx, mint(s, time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	if n := v.cache.ids.Len(); n > 2 {
		t.Fatalf("cache holds %d tokens, bound is 2", n)
	}
}

func BenchmarkVerify(b *testing.B) {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	iss, _ := devissuer.New("", key)
	srv := httptest.NewServer(iss)
	defer srv.Close()
	iss.URL = srv.URL
	tok, _ := iss.Mint(devissuer.TokenRequest{Subject: "a"})
	for _, size := range []int{-1, 0} {
		name := map[int]string{-1: "uncached", 0: "cached"}[size]
		b.Run(name, func(b *testing.B) {
			v, err := New(context.Background(), Config{Rules: Rules{Issuer: srv.URL, ClientIDs: []string{devissuer.ClientID}}, CacheSize: size})
			if err != nil {
				b.Fatal(err)
			}
			defer v.Close()
			for b.Loop() {
				if _, err := v.Verify(context.Background(), tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
