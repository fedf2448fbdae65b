package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/MicahParks/jwkset"
	"golang.org/x/time/rate"
)

const (
	// fetchTimeout bounds one fetch of the key set, whatever the HTTP client.
	fetchTimeout = 10 * time.Second
	// maxJWKSBytes bounds the key set and discovery documents (as Neon's
	// proxy does). Cognito's key set is under 2 KB.
	maxJWKSBytes = 64 << 10
	// failureLogEvery bounds the lines logged about failed fetches.
	failureLogEvery = time.Minute
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
	url     string          // the key set's; "" until discovery finds it
	issuer  string          // for OIDC discovery, when url is ""
	client  *http.Client
	onFetch func(ok bool)
	log     *slog.Logger
	limiter *rate.Limiter

	mu      sync.Mutex
	running *fetchCall
	// failures counts the fetches that failed since the last logged line
	// (logged is when), so that an outage is logged once a minute, and the
	// recovery once.
	failures int
	logged   time.Time
}

type fetchCall struct {
	done chan struct{}
	err  error
}

func newKeySet(ctx context.Context, url, issuer string, client *http.Client, onFetch func(bool), log *slog.Logger, unknownKeyInterval time.Duration) *keySet {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &keySet{
		Storage: jwkset.NewMemoryStorage(),
		ctx:     ctx,
		url:     url,
		issuer:  issuer,
		client:  client,
		onFetch: onFetch,
		log:     log,
		limiter: rate.NewLimiter(rate.Every(unknownKeyInterval), 1),
	}
}

// observe logs a fetch's outcome: failures at most once a minute, with how
// many there were, and the first success after them.
func (k *keySet) observe(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	switch {
	case err == nil && k.failures > 0:
		k.log.Info("issuer keys fetched again", "jwks", k.url, "failed_fetches", k.failures)
		k.failures = 0
	case err != nil:
		k.failures++
		if now.Sub(k.logged) >= failureLogEvery {
			k.log.Warn("issuer keys not fetched; the last good set stays in use", "error", err, "failed_fetches", k.failures)
			k.logged = now
		}
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
		k.observe(call.err)
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

// get fetches a JSON document of at most maxJWKSBytes into v.
func (k *keySet) get(ctx context.Context, from, what string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, from, nil)
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
		return fmt.Errorf("%s at %s answered %s", what, from, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return fmt.Errorf("%s at %s: %w", what, from, err)
	}
	if len(body) > maxJWKSBytes {
		return fmt.Errorf("%s at %s is larger than %d KiB", what, from, maxJWKSBytes>>10)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%s at %s: %w", what, from, err)
	}
	return nil
}

// jwksURL is the key set's location: --jwks-url, or what the issuer's OIDC
// discovery document names (jwks_uri), or, when the issuer publishes none,
// <issuer>/.well-known/jwks.json.
func (k *keySet) jwksURL(ctx context.Context) (string, error) {
	k.mu.Lock()
	known := k.url
	k.mu.Unlock()
	if known != "" {
		return known, nil
	}
	base := strings.TrimSuffix(k.issuer, "/")
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	err := k.get(ctx, base+"/.well-known/openid-configuration", "OIDC discovery", &doc)
	var unreachable *url.Error
	switch {
	case errors.As(err, &unreachable) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		return "", err // try again at the next fetch
	case err != nil && strings.Contains(err.Error(), " answered 5"):
		return "", err
	case err == nil && doc.JWKSURI != "" && doc.Issuer != "" && strings.TrimSuffix(doc.Issuer, "/") != base:
		return "", fmt.Errorf("OIDC discovery of %s is for issuer %s", k.issuer, safeText(doc.Issuer))
	}
	jwks := doc.JWKSURI
	if err != nil || jwks == "" {
		// No discovery document (404, not one): the conventional place.
		jwks = base + "/.well-known/jwks.json"
	}
	if err := checkURL("jwks_uri", jwks); err != nil {
		return "", err
	}
	k.mu.Lock()
	k.url = jwks
	k.mu.Unlock()
	return jwks, nil
}

// fetch downloads the key set and replaces the stored keys with it, only
// if it is a key set with at least one usable key: an API gateway's or a
// CDN's error page answered with 200 never takes the keys away. On error
// the keys of the last good fetch stay.
func (k *keySet) fetch(ctx context.Context) error {
	url, err := k.jwksURL(ctx)
	if err != nil {
		return err
	}
	var set jwkset.JWKSMarshal
	if err := k.get(ctx, url, "JWKS", &set); err != nil {
		return err
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
			return fmt.Errorf("JWKS at %s: key %s: %w", url, safeText(m.KID), err)
		}
		keys = append(keys, jwk)
	}
	if len(keys) == 0 {
		return fmt.Errorf("JWKS at %s holds no usable key (%d keys): not a key set, or an error page", url, len(set.Keys))
	}
	return k.Storage.KeyReplaceAll(ctx, keys)
}
