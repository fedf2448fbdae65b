// Package auth verifies identity tokens (JWTs from AWS Cognito or any OIDC
// issuer) against the issuer's published keys and turns them into an Identity.
package auth

import (
	"log/slog"

	"github.com/rlsproxy/rlsproxy/internal/loopback"

	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
)

// Algorithms are the signing algorithms accepted. Never "none" and never an
// HMAC: with a public key as the HMAC secret, anyone could sign.
var algorithms = []string{"RS256", "ES256"}

// DefaultMaxTokenBytes bounds the size of a token. Cognito tokens are 1-2 KB;
// a user in many groups makes them larger.
const DefaultMaxTokenBytes = 16 << 10

// maxLeeway bounds Rules.Leeway: a larger skew would keep expired tokens alive.
const maxLeeway = 5 * time.Minute

// Config configures a Verifier.
type Config struct {
	Rules
	// JWKSURL is where the issuer publishes its keys; defaults to
	// <Issuer>/.well-known/jwks.json.
	JWKSURL string
	// RefreshInterval is how often keys are refetched in the background.
	RefreshInterval time.Duration
	// UnknownKeyInterval is the least time between refetches caused by a
	// token whose key id is unknown, so a flood of such tokens costs the
	// issuer one request per interval.
	UnknownKeyInterval time.Duration
	// MaxTokenBytes bounds the token size; zero means DefaultMaxTokenBytes.
	MaxTokenBytes int
	// HTTPClient fetches the keys; nil means a client with a 10 s timeout.
	HTTPClient *http.Client
	// OnFetch, if set, is called after every key fetch with its outcome.
	OnFetch func(ok bool)
	// Logger receives failed key fetches (at most one line a minute) and
	// the recovery after them; nil discards them.
	Logger *slog.Logger
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// CacheSize bounds the verified tokens remembered until they expire;
	// zero means DefaultCacheSize, negative turns the cache off.
	CacheSize int
	// OnCacheLookup, if set, is called with the outcome of every cache lookup.
	OnCacheLookup func(hit bool)
}

// DefaultCacheSize is the number of verified tokens remembered by default.
const DefaultCacheSize = 10000

// CognitoIssuer returns the issuer URL of a Cognito user pool.
func CognitoIssuer(region, userPoolID string) string {
	return fmt.Sprintf("https://cognito-idp.%s.amazonaws.com/%s", region, userPoolID)
}

// IsCognitoIssuer reports whether issuer is a Cognito user pool URL.
func IsCognitoIssuer(issuer string) bool {
	u, err := url.Parse(issuer)
	return err == nil && strings.HasPrefix(u.Host, "cognito-idp.") && strings.HasSuffix(u.Host, ".amazonaws.com")
}

// Verifier checks tokens. It is safe for concurrent use.
type Verifier struct {
	cfg    Config
	cache  *tokenCache // nil when off
	keys   *keySet
	kf     keyfunc.Keyfunc
	parser *jwt.Parser
	cancel context.CancelFunc
}

// New starts fetching the issuer's keys in the background and returns at once;
// Ready reports when they are loaded. Close stops the background refresh.
// A token checked before the first fetch ends waits for that fetch.
func New(ctx context.Context, cfg Config) (*Verifier, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("no issuer configured: set --cognito-region and --cognito-user-pool-id, or --issuer")
	}
	if err := checkURL("issuer", cfg.Issuer); err != nil {
		return nil, err
	}
	jwksURL := cfg.JWKSURL
	if jwksURL == "" && (cfg.Cognito || IsCognitoIssuer(cfg.Issuer)) {
		// Cognito publishes its keys there and nowhere else.
		jwksURL = strings.TrimSuffix(cfg.Issuer, "/") + "/.well-known/jwks.json"
	}
	if jwksURL != "" {
		if err := checkURL("JWKS URL", jwksURL); err != nil {
			return nil, err
		}
	}
	if cfg.JWKSURL == "" {
		// For messages; the keys come from OIDC discovery where jwksURL is "".
		cfg.JWKSURL = strings.TrimSuffix(cfg.Issuer, "/") + "/.well-known/jwks.json (or as OIDC discovery names it)"
		if jwksURL != "" {
			cfg.JWKSURL = jwksURL
		}
	}
	switch cfg.TokenUse {
	case "":
		cfg.TokenUse = "access"
	case "access", "id", "any":
	default:
		return nil, fmt.Errorf("--token-use must be access, id or any, not %q", cfg.TokenUse)
	}
	if cfg.Cognito && len(cfg.ClientIDs) == 0 {
		return nil, errors.New("--client-id is required with a Cognito user pool: without it, tokens of every app client of the pool would be accepted")
	}
	if cfg.Leeway < 0 || cfg.Leeway > maxLeeway {
		return nil, fmt.Errorf("--leeway must be between 0 and %s, not %s: it only absorbs clock skew", maxLeeway, cfg.Leeway)
	}
	if cfg.MaxTokenBytes == 0 {
		cfg.MaxTokenBytes = DefaultMaxTokenBytes
	}
	if cfg.RefreshInterval == 0 {
		cfg.RefreshInterval = time.Hour
	}
	if cfg.UnknownKeyInterval == 0 {
		cfg.UnknownKeyInterval = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	client := cfg.HTTPClient
	if client == nil {
		client = &http.Client{Timeout: fetchTimeout, CheckRedirect: checkRedirect}
	}

	ctx, cancel := context.WithCancel(ctx)
	keys := newKeySet(ctx, jwksURL, cfg.Issuer, client, cfg.OnFetch, cfg.Logger, cfg.UnknownKeyInterval)
	kf, err := keyfunc.New(keyfunc.Options{Ctx: ctx, Storage: keys})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("keys of issuer %s: %w", cfg.Issuer, err)
	}
	go keys.run(cfg.RefreshInterval)
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	var cache *tokenCache
	if cfg.CacheSize > 0 {
		cache = newTokenCache(cfg.CacheSize)
	}
	return &Verifier{
		cfg:    cfg,
		cache:  cache,
		keys:   keys,
		kf:     kf,
		parser: jwt.NewParser(jwt.WithValidMethods(algorithms), jwt.WithoutClaimsValidation(), jwt.WithJSONNumber()),
		cancel: cancel,
	}, nil
}

// Close stops the background key refresh.
func (v *Verifier) Close() { v.cancel() }

// Ready reports whether the issuer's keys are loaded.
func (v *Verifier) Ready(ctx context.Context) bool {
	return v.keys.loaded(ctx)
}

// Load waits until the issuer's keys are loaded, fetching them if no fetch
// is running, and says why they could not be: a reload checks a new
// issuer's keys this way before sessions depend on them.
func (v *Verifier) Load(ctx context.Context) error {
	if v.keys.loaded(ctx) {
		return nil
	}
	if err := v.keys.refresh(ctx); err != nil {
		return fmt.Errorf("keys of issuer %s: %w", v.cfg.Issuer, err)
	}
	if !v.keys.loaded(ctx) {
		return fmt.Errorf("keys of issuer %s: none loaded", v.cfg.Issuer)
	}
	return nil
}

// Verify checks token and returns the identity it carries, or an *Error.
// A token verified before is answered from the cache until it expires.
func (v *Verifier) Verify(ctx context.Context, token string) (*Identity, error) {
	if v.cache == nil || len(token) > v.cfg.MaxTokenBytes {
		return v.verify(ctx, token)
	}
	key := sha256.Sum256([]byte(token))
	now := v.cfg.Now()
	if id := v.cache.get(key, now, v.cfg.Leeway); id != nil && v.published(ctx, id) {
		v.observeCache(true)
		if _, err := v.cfg.Rules.checkTimes(id.Claims, now); err != nil {
			return nil, err
		}
		return id, nil
	}
	v.observeCache(false)
	id, err := v.verify(ctx, token)
	if err == nil {
		v.cache.put(key, id)
	}
	return id, err
}

// published reports whether the key that verified a cached identity is
// still in the issuer's key set: a key the issuer withdrew (compromised,
// rotated out) ends the tokens it signed, cached or not.
func (v *Verifier) published(ctx context.Context, id *Identity) bool {
	if id.keyID == "" {
		return true // no kid: keyfunc tried every key; nothing to look up
	}
	_, err := v.keys.Storage.KeyRead(ctx, id.keyID)
	return err == nil
}

func (v *Verifier) observeCache(hit bool) {
	if v.cfg.OnCacheLookup != nil {
		v.cfg.OnCacheLookup(hit)
	}
}

// verify checks token without the cache.
func (v *Verifier) verify(ctx context.Context, token string) (*Identity, error) {
	if len(token) > v.cfg.MaxTokenBytes {
		return nil, invalid("too_large", fmt.Sprintf("token is larger than %d bytes", v.cfg.MaxTokenBytes))
	}
	if token == "" {
		return nil, invalid("missing", "no token: send an identity token of "+v.cfg.Issuer+" as the password")
	}
	hdr, err := parseHeader(token)
	if err != nil {
		return nil, invalid("malformed", "the password is not a JWT: send an identity token of "+v.cfg.Issuer+" as the password")
	}
	if !slices.Contains(algorithms, hdr.Alg) {
		return nil, invalid("algorithm", fmt.Sprintf("token algorithm %q is not accepted (accepted: %s)", safeText(hdr.Alg), strings.Join(algorithms, ", ")))
	}

	claims := jwt.MapClaims{}
	_, err = v.parser.ParseWithClaims(token, claims, v.kf.KeyfuncCtx(ctx))
	switch {
	case err == nil:
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		if !v.Ready(ctx) {
			return nil, &Error{Kind: Unavailable, Reason: "keys_unavailable",
				Msg: fmt.Sprintf("keys of issuer %s are not loaded yet (JWKS at %s): try again shortly", v.cfg.Issuer, v.cfg.JWKSURL)}
		}
		if jwk, err := v.keys.Storage.KeyRead(ctx, hdr.Kid); err == nil && hdr.Kid != "" {
			// The key is published but keyfunc refused it: its alg differs.
			return nil, invalid("algorithm", fmt.Sprintf("token key id %s of issuer %s is for algorithm %s, but the token says %s",
				safeText(hdr.Kid), v.cfg.Issuer, jwk.Marshal().ALG, hdr.Alg))
		}
		if hdr.Kid == "" {
			return nil, invalid("unknown_key", "token has no key id (kid) and matches no key of issuer "+v.cfg.Issuer)
		}
		return nil, invalid("unknown_key", fmt.Sprintf("token key id %s is not published by issuer %s", safeText(hdr.Kid), v.cfg.Issuer))
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return nil, invalid("signature", "token signature does not match any key of issuer "+v.cfg.Issuer)
	default:
		return nil, invalid("malformed", "the password is not a well-formed JWT: send an identity token of "+v.cfg.Issuer+" as the password")
	}
	id, err := v.cfg.Rules.Check(claims, v.cfg.Now())
	if id != nil {
		id.keyID = hdr.Kid
	}
	return id, err
}

type header struct {
	Alg string `json:"alg"`
	Kid string `json:"kid"`
}

func parseHeader(token string) (header, error) {
	var h header
	first, rest, ok := strings.Cut(token, ".")
	if !ok || strings.Count(rest, ".") != 1 {
		return h, errors.New("not three segments")
	}
	raw, err := base64.RawURLEncoding.DecodeString(first)
	if err != nil {
		return h, err
	}
	return h, json.Unmarshal(raw, &h)
}

// safeText keeps a header value printable, valid UTF-8 and short before it
// goes in a message.
func safeText(s string) string {
	const limit = 64
	if len(s) > limit {
		cut := limit
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "..."
	}
	return strings.Map(func(r rune) rune {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, s)
}

// checkURL allows plain http only towards loopback, where nobody can tamper
// with the keys in transit.
func checkURL(what, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%s %q is not a URL", what, raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if loopback.Host(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("%s %s must use https (plain http is allowed for loopback only)", what, raw)
	}
	return fmt.Errorf("%s %s must use https", what, raw)
}

// checkRedirect holds redirects of the key fetch to the rule of checkURL: an
// https JWKS URL must not lead to keys fetched over plain http.
func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 5 {
		return errors.New("stopped after 5 redirects")
	}
	return checkURL("JWKS redirect", req.URL.String())
}
