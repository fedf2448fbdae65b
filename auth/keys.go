package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/MicahParks/jwkset"
	"golang.org/x/time/rate"
)

const (
	// fetchTimeout bounds one fetch of the key set, whatever the HTTP client.
	fetchTimeout = 10 * time.Second
	// maxJWKSBytes bounds the key set document. Cognito's is under 2 KB.
	maxJWKSBytes = 1 << 20
	// maxRetry bounds the wait between fetches while no key is loaded.
	maxRetry = 30 * time.Second
)

// keySet holds the issuer's published keys. It refetches them in the
// background and, at most once per limiter interval, when a token names a key
// id it does not know (the issuer rotated its keys). Callers that arrive while
// a fetch runs wait for that fetch instead of starting another.
//
// It replaces keyfunc's own HTTP storage, which ran the unknown-kid refetch
// under the rate limiter's wait deadline: with a short deadline (needed so a
// flood of unknown kids is refused at once) the HTTP request itself was
// cancelled, and a rotated key was never picked up before the next periodic
// refresh.
type keySet struct {
	jwkset.Storage // the keys of the last good fetch

	ctx     context.Context // ends with the Verifier
	url     string
	client  *http.Client
	onFetch func(ok bool)
	limiter *rate.Limiter

	mu      sync.Mutex
	running *fetchCall
}

type fetchCall struct {
	done chan struct{}
	err  error
}

func newKeySet(ctx context.Context, url string, client *http.Client, onFetch func(bool), unknownKeyInterval time.Duration) *keySet {
	return &keySet{
		Storage: jwkset.NewMemoryStorage(),
		ctx:     ctx,
		url:     url,
		client:  client,
		onFetch: onFetch,
		limiter: rate.NewLimiter(rate.Every(unknownKeyInterval), 1),
	}
}

// run fetches the keys now and then every interval until ctx ends. While no
// key is loaded it retries sooner, with a growing delay, so that an issuer
// outage at startup does not leave the proxy unready for a whole interval.
func (k *keySet) run(interval time.Duration) {
	retry := time.Second
	for {
		wait := interval
		_ = k.refresh(k.ctx)
		if !k.loaded(k.ctx) {
			wait = min(retry, interval)
			retry = min(2*retry, maxRetry)
		} else {
			retry = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-k.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// KeyRead returns the key kid, refetching the set first when kid is unknown
// and the rate limit allows (or a fetch is already running).
func (k *keySet) KeyRead(ctx context.Context, kid string) (jwkset.JWK, error) {
	jwk, err := k.Storage.KeyRead(ctx, kid)
	if !errors.Is(err, jwkset.ErrKeyNotFound) {
		return jwk, err
	}
	k.mu.Lock()
	call := k.running
	if call == nil {
		if !k.limiter.Allow() {
			k.mu.Unlock()
			return jwk, err
		}
		call = k.startLocked()
	}
	k.mu.Unlock()
	if k.wait(ctx, call) != nil {
		return jwk, err
	}
	return k.Storage.KeyRead(ctx, kid)
}

func (k *keySet) loaded(ctx context.Context) bool {
	keys, err := k.Storage.KeyReadAll(ctx)
	return err == nil && len(keys) > 0
}

// refresh fetches the set, or joins the fetch already running.
func (k *keySet) refresh(ctx context.Context) error {
	k.mu.Lock()
	call := k.running
	if call == nil {
		call = k.startLocked()
	}
	k.mu.Unlock()
	return k.wait(ctx, call)
}

func (k *keySet) wait(ctx context.Context, call *fetchCall) error {
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// startLocked starts a fetch; k.mu must be held. The fetch runs under the
// Verifier's context, not a caller's, so a caller that gives up does not
// cancel it for the others waiting.
func (k *keySet) startLocked() *fetchCall {
	call := &fetchCall{done: make(chan struct{})}
	k.running = call
	go func() {
		ctx, cancel := context.WithTimeout(k.ctx, fetchTimeout)
		call.err = k.fetch(ctx)
		cancel()
		if k.onFetch != nil {
			k.onFetch(call.err == nil)
		}
		k.mu.Lock()
		k.running = nil
		k.mu.Unlock()
		close(call.done)
	}()
	return call
}

// fetch downloads the key set and replaces the stored keys with it. On error
// the keys of the last good fetch stay.
func (k *keySet) fetch(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("JWKS at %s answered %s", k.url, resp.Status)
	}
	var set jwkset.JWKSMarshal
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxJWKSBytes)).Decode(&set); err != nil {
		return fmt.Errorf("JWKS at %s: %w", k.url, err)
	}
	keys := make([]jwkset.JWK, 0, len(set.Keys))
	for _, m := range set.Keys {
		if m.KTY == jwkset.KtyOct {
			continue // a symmetric key never verifies a token here
		}
		jwk, err := jwkset.NewJWKFromMarshal(m, jwkset.JWKMarshalOptions{}, jwkset.JWKValidateOptions{})
		switch {
		case errors.Is(err, jwkset.ErrUnsupportedKey):
			continue
		case err != nil:
			return fmt.Errorf("JWKS at %s: key %s: %w", k.url, safeText(m.KID), err)
		}
		keys = append(keys, jwk)
	}
	return k.Storage.KeyReplaceAll(ctx, keys)
}
