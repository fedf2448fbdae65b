package auth

import (
	"log/slog"

	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// RSA key generation costs up to a second under -race, so the package shares
// a few keys. EC keys are cheap and made fresh where a test needs its own.
var (
	issuerRSAKey = sync.OnceValue(func() *rsa.PrivateKey { return mustRSAKey() })
	otherRSAKey  = sync.OnceValue(func() *rsa.PrivateKey { return mustRSAKey() })
)

func mustRSAKey() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
}

func newECKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// testIssuer is a dev issuer behind a real HTTP server that counts JWKS
// fetches and can be told to fail or to answer slowly.
type testIssuer struct {
	*devissuer.Issuer
	fetches atomic.Int64
	failing atomic.Bool
	delay   atomic.Int64 // nanoseconds before each answer
}

func newTestIssuer(t testing.TB, keys ...crypto.Signer) *testIssuer {
	t.Helper()
	if len(keys) == 0 {
		keys = []crypto.Signer{issuerRSAKey()}
	}
	d, err := devissuer.New("", keys...)
	if err != nil {
		t.Fatal(err)
	}
	ti := &testIssuer{Issuer: d}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/.well-known/jwks.json" {
			ti.fetches.Add(1)
		}
		if d := time.Duration(ti.delay.Load()); d > 0 {
			select {
			case <-time.After(d):
			case <-r.Context().Done(): // the verifier gave up or closed
				return
			}
		}
		if ti.failing.Load() {
			http.Error(w, "issuer down", http.StatusInternalServerError)
			return
		}
		d.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	d.URL = srv.URL
	return ti
}

// baseConfig is how `rlsproxy dev` configures the proxy for its issuer:
// Cognito rules, access tokens of the dev app client.
func (ti *testIssuer) baseConfig() Config {
	return Config{Rules: Rules{
		Issuer:    ti.URL,
		Cognito:   true,
		TokenUse:  "access",
		ClientIDs: []string{devissuer.ClientID},
		Leeway:    30 * time.Second,
	}}
}

// start builds a Verifier and waits until it has the keys, so that tests
// about rejections are not about readiness.
func (ti *testIssuer) start(t testing.TB, cfg Config) *Verifier {
	t.Helper()
	v := startVerifier(t, cfg)
	waitFor(t, "the verifier to load the keys", func() bool { return v.Ready(context.Background()) })
	return v
}

func startVerifier(t testing.TB, cfg Config) *Verifier {
	t.Helper()
	v, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return v
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// accessClaims are the claims of a good Cognito access token at time now.
func (ti *testIssuer) accessClaims(now time.Time) jwt.MapClaims {
	return jwt.MapClaims{
		"iss":       ti.URL,
		"sub":       "user-1",
		"iat":       now.Unix(),
		"exp":       now.Add(time.Hour).Unix(),
		"token_use": "access",
		"client_id": devissuer.ClientID,
	}
}

func (ti *testIssuer) sign(t testing.TB, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := ti.Sign(claims, "")
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// forge signs claims with any method and key, with the given header fields.
func forge(t testing.TB, method jwt.SigningMethod, key any, header map[string]any, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, claims)
	for k, v := range header {
		tok.Header[k] = v
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// expectRejection checks a rejection the way the client will see it: its
// kind (which picks the SQLSTATE), its metric label, a message that tells the
// person what is wrong, and no trace of the token in that message.
func expectRejection(t *testing.T, id *Identity, err error, token string, kind Kind, reason, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("token accepted (subject %q), want rejection %s", id.Subject, reason)
	}
	if id != nil {
		t.Errorf("rejected token still returned an identity")
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %T %v is not an *auth.Error", err, err)
	}
	if e.Kind != kind || e.Reason != reason {
		t.Errorf("kind %d reason %q, want kind %d reason %q (message %q)", e.Kind, e.Reason, kind, reason, e.Msg)
	}
	if !strings.Contains(e.Msg, msg) {
		t.Errorf("message %q does not say %q", e.Msg, msg)
	}
	if e.Error() != e.Msg {
		t.Errorf("Error() %q differs from Msg %q", e.Error(), e.Msg)
	}
	expectNoToken(t, e.Msg, token)
}

func expectNoToken(t testing.TB, msg, token string) {
	t.Helper()
	if len(token) >= 16 && strings.Contains(msg, token) {
		t.Errorf("message contains the token: %q", msg)
	}
	// Any segment is as bad as the whole: the signature one lets a token be
	// replayed, the payload one carries the claims.
	for i, seg := range strings.Split(token, ".") {
		if len(seg) >= 16 && strings.Contains(msg, seg) {
			t.Errorf("message contains segment %d of the token: %q", i, msg)
		}
	}
}

// TestVerifyRejects runs one bad token per rule against a real JWKS served
// over HTTP. The clock is pinned so that the dates in messages are exact.
func TestVerifyRejects(t *testing.T) {
	now := time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)
	ti := newTestIssuer(t)
	cfg := ti.baseConfig()
	cfg.Now = func() time.Time { return now }
	cfg.MaxTokenBytes = 4096
	v := ti.start(t, cfg)
	kid := ti.KeyIDs()[0]
	issuerKey := issuerRSAKey()

	// with returns the good claims with some changed (nil deletes).
	with := func(changes map[string]any) jwt.MapClaims {
		c := ti.accessClaims(now)
		for k, val := range changes {
			if val == nil {
				delete(c, k)
			} else {
				c[k] = val
			}
		}
		return c
	}
	good := ti.sign(t, with(nil))
	goodParts := strings.Split(good, ".")
	publicPEM := func() []byte {
		der, err := x509.MarshalPKIXPublicKey(&issuerKey.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	}()

	tests := []struct {
		name   string
		token  string
		kind   Kind
		reason string
		msg    string
	}{
		{
			name:  "expired beyond leeway",
			token: ti.sign(t, with(map[string]any{"iat": now.Add(-2 * time.Hour).Unix(), "exp": now.Add(-31 * time.Second).Unix()})),
			kind:  Invalid, reason: "expired", msg: "token expired at 2026-03-14T15:08:55Z",
		},
		{
			name:  "not yet valid beyond leeway",
			token: ti.sign(t, with(map[string]any{"nbf": now.Add(time.Minute).Unix()})),
			kind:  Invalid, reason: "not_yet_valid", msg: "token is not valid before 2026-03-14T15:10:26Z",
		},
		{
			name:  "issued in the future beyond leeway",
			token: ti.sign(t, with(map[string]any{"iat": now.Add(10 * time.Minute).Unix()})),
			kind:  Invalid, reason: "issued_in_future", msg: "issued in the future, at 2026-03-14T15:19:26Z: check the clocks",
		},
		{
			name:  "no exp",
			token: ti.sign(t, with(map[string]any{"exp": nil})),
			kind:  Invalid, reason: "malformed", msg: "token has no exp claim",
		},
		{
			name:  "exp not a number",
			token: ti.sign(t, with(map[string]any{"exp": "tomorrow"})),
			kind:  Invalid, reason: "malformed", msg: "token claim exp is not a number",
		},
		{
			name:  "exp out of range",
			token: ti.sign(t, with(map[string]any{"exp": 1e300})),
			kind:  Invalid, reason: "malformed", msg: "token claim exp is out of range",
		},
		{
			name:  "no sub",
			token: ti.sign(t, with(map[string]any{"sub": nil})),
			kind:  Invalid, reason: "malformed", msg: "token has no sub claim",
		},
		{
			name:  "empty sub",
			token: ti.sign(t, with(map[string]any{"sub": ""})),
			kind:  Invalid, reason: "malformed", msg: "token has no sub claim",
		},
		{
			name:  "wrong issuer",
			token: ti.sign(t, with(map[string]any{"iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_other"})),
			kind:  Invalid, reason: "issuer", msg: "token was not issued by " + ti.URL,
		},
		{
			name:  "no issuer",
			token: ti.sign(t, with(map[string]any{"iss": nil})),
			kind:  Invalid, reason: "issuer", msg: "token was not issued by " + ti.URL,
		},
		{
			name:  "unknown kid",
			token: forge(t, jwt.SigningMethodRS256, otherRSAKey(), map[string]any{"kid": "not-a-key"}, with(nil)),
			kind:  Invalid, reason: "unknown_key", msg: "token key id not-a-key is not published by issuer " + ti.URL,
		},
		{
			// Same kid, other key: the kid must select a key, never vouch for it.
			name:  "signature by another key with the same kid",
			token: forge(t, jwt.SigningMethodRS256, otherRSAKey(), map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "signature", msg: "token signature does not match any key of issuer " + ti.URL,
		},
		{
			name:  "no kid, signed by another key",
			token: forge(t, jwt.SigningMethodRS256, otherRSAKey(), nil, with(nil)),
			kind:  Invalid, reason: "signature", msg: "token signature does not match any key of issuer",
		},
		{
			name:  "payload changed after signing",
			token: goodParts[0] + "." + b64(`{"iss":"`+ti.URL+`","sub":"admin","exp":9999999999,"token_use":"access","client_id":"rlsproxy-dev"}`) + "." + goodParts[2],
			kind:  Invalid, reason: "signature", msg: "token signature does not match",
		},
		{
			name:  "alg none",
			token: forge(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "none" is not accepted (accepted: RS256, ES256)`,
		},
		{
			name:  "alg none spelled None",
			token: b64(`{"alg":"None","typ":"JWT"}`) + "." + goodParts[1] + ".",
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "None" is not accepted`,
		},
		{
			// The classic confusion attack: the RSA public key is public, so
			// if it were accepted as an HMAC secret anyone could sign.
			name:  "HS256 with the issuer's public key as secret",
			token: forge(t, jwt.SigningMethodHS256, publicPEM, map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "HS256" is not accepted`,
		},
		{
			name:  "HS256 with the public key DER as secret, no kid",
			token: forge(t, jwt.SigningMethodHS256, x509.MarshalPKCS1PublicKey(&issuerKey.PublicKey), nil, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "HS256" is not accepted`,
		},
		{
			// Signed by the issuer's own key, so only the allow-list stops it.
			name:  "RS512 with the issuer's key",
			token: forge(t, jwt.SigningMethodRS512, issuerKey, map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "RS512" is not accepted`,
		},
		{
			name:  "PS256 with the issuer's key",
			token: forge(t, jwt.SigningMethodPS256, issuerKey, map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "PS256" is not accepted`,
		},
		{
			name:  "no alg",
			token: b64(`{"kid":"`+kid+`"}`) + "." + goodParts[1] + "." + goodParts[2],
			kind:  Invalid, reason: "algorithm", msg: `token algorithm "" is not accepted`,
		},
		{
			// ES256 is allowed, but this kid is an RS256 key: the JWKS alg wins.
			name:  "ES256 header naming the RS256 key",
			token: forge(t, jwt.SigningMethodES256, newECKey(t), map[string]any{"kid": kid}, with(nil)),
			kind:  Invalid, reason: "algorithm", msg: "token key id " + kid + " of issuer " + ti.URL + " is for algorithm RS256, but the token says ES256",
		},
		{
			name:  "two segments",
			token: goodParts[0] + "." + goodParts[1],
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT: send an identity token of " + ti.URL + " as the password",
		},
		{
			name:  "four segments",
			token: good + ".AAAA",
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "an ordinary password",
			token: "correct horse battery staple",
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "header not base64url",
			token: "eyJ*bad*." + goodParts[1] + "." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "header padded base64",
			token: base64.URLEncoding.EncodeToString([]byte(`{"alg":"RS256","kid":"`+kid+`"}`)) + "=." + goodParts[1] + "." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "header not JSON",
			token: b64(`{"alg":"RS256",`) + "." + goodParts[1] + "." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "kid not a string",
			token: b64(`{"alg":"RS256","kid":42}`) + "." + goodParts[1] + "." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a JWT",
		},
		{
			name:  "payload not JSON",
			token: goodParts[0] + "." + b64(`{"sub":`) + "." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a well-formed JWT: send an identity token of " + ti.URL,
		},
		{
			name:  "payload not base64url",
			token: goodParts[0] + ".!!!!." + goodParts[2],
			kind:  Invalid, reason: "malformed", msg: "the password is not a well-formed JWT",
		},
		{
			name:  "signature not base64url",
			token: goodParts[0] + "." + goodParts[1] + ".***" + goodParts[2][3:],
			kind:  Invalid, reason: "malformed", msg: "the password is not a well-formed JWT",
		},
		{
			name:  "empty signature",
			token: goodParts[0] + "." + goodParts[1] + ".",
			kind:  Invalid, reason: "signature", msg: "token signature does not match",
		},
		{
			name:  "too large",
			token: ti.sign(t, with(map[string]any{"padding": strings.Repeat("x", 5000)})),
			kind:  Invalid, reason: "too_large", msg: "token is larger than 4096 bytes",
		},
		{
			// Checked before anything else: even garbage this big is not parsed.
			name:  "too large garbage",
			token: strings.Repeat("A", 4097),
			kind:  Invalid, reason: "too_large", msg: "token is larger than 4096 bytes",
		},
		{
			name:  "empty",
			token: "",
			kind:  Invalid, reason: "missing", msg: "no token: send an identity token of " + ti.URL + " as the password",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := v.Verify(context.Background(), tc.token)
			expectRejection(t, id, err, tc.token, tc.kind, tc.reason, tc.msg)
		})
	}

	// The table is worthless if the good token would be refused too.
	if _, err := v.Verify(context.Background(), good); err != nil {
		t.Fatalf("the unmodified token is refused: %v", err)
	}
}

// TestVerifyAccepts checks both allowed algorithms and a token without kid,
// which is tried against every published key.
func TestVerifyAccepts(t *testing.T) {
	ec := newECKey(t)
	ti := newTestIssuer(t, issuerRSAKey(), ec)
	v := ti.start(t, ti.baseConfig())
	ids := ti.KeyIDs()
	claims := ti.accessClaims(time.Now())

	tests := []struct {
		name  string
		token string
	}{
		{"RS256", forge(t, jwt.SigningMethodRS256, issuerRSAKey(), map[string]any{"kid": ids[0]}, claims)},
		{"ES256", forge(t, jwt.SigningMethodES256, ec, map[string]any{"kid": ids[1]}, claims)},
		{"RS256 without kid", forge(t, jwt.SigningMethodRS256, issuerRSAKey(), nil, claims)},
		{"ES256 without kid", forge(t, jwt.SigningMethodES256, ec, nil, claims)},
		{"minted by the dev issuer", mint(t, ti.Issuer, devissuer.TokenRequest{Subject: "user-1"})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := v.Verify(context.Background(), tc.token)
			if err != nil {
				t.Fatalf("rejected: %v", err)
			}
			if id.Subject != "user-1" {
				t.Errorf("subject %q, want user-1", id.Subject)
			}
		})
	}
}

func mint(t testing.TB, d *devissuer.Issuer, req devissuer.TokenRequest) string {
	t.Helper()
	tok, err := d.Mint(req)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestVerifyLeeway pins the clock on each side of exp, nbf and iat: within the
// leeway a token passes (clock skew), one second beyond it does not.
func TestVerifyLeeway(t *testing.T) {
	const leeway = 30 * time.Second
	edge := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ti := newTestIssuer(t)
	var now atomic.Pointer[time.Time]
	cfg := ti.baseConfig()
	cfg.Leeway = leeway
	cfg.Now = func() time.Time { return *now.Load() }
	v := ti.start(t, cfg)

	claims := func(name string) jwt.MapClaims {
		c := ti.accessClaims(edge)
		switch name {
		case "exp":
			c["iat"], c["exp"] = edge.Add(-time.Hour).Unix(), edge.Unix()
		case "nbf":
			c["nbf"] = edge.Unix()
		case "iat":
			c["iat"] = edge.Unix()
		}
		return c
	}
	tests := []struct {
		claim  string
		now    time.Time
		reason string // empty: accepted
	}{
		{"exp", edge, ""},
		{"exp", edge.Add(leeway - time.Second), ""},
		{"exp", edge.Add(leeway), ""},
		{"exp", edge.Add(leeway + time.Second), "expired"},
		{"nbf", edge, ""},
		{"nbf", edge.Add(-leeway + time.Second), ""},
		{"nbf", edge.Add(-leeway), ""},
		{"nbf", edge.Add(-leeway - time.Second), "not_yet_valid"},
		{"iat", edge.Add(-leeway), ""},
		{"iat", edge.Add(-leeway - time.Second), "issued_in_future"},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s %+v", tc.claim, tc.now.Sub(edge)), func(t *testing.T) {
			now.Store(&tc.now)
			tok := ti.sign(t, claims(tc.claim))
			id, err := v.Verify(context.Background(), tok)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("rejected within the leeway: %v", err)
				}
				return
			}
			expectRejection(t, id, err, tok, Invalid, tc.reason, "2026-01-02T03:04:05Z")
		})
	}
}

// TestVerifyLeewayZero: without leeway, one second past exp is too late.
func TestVerifyLeewayZero(t *testing.T) {
	edge := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ti := newTestIssuer(t)
	cfg := ti.baseConfig()
	cfg.Leeway = 0
	cfg.Now = func() time.Time { return edge.Add(time.Second) }
	v := ti.start(t, cfg)
	c := ti.accessClaims(edge.Add(-time.Hour))
	c["exp"] = edge.Unix()
	tok := ti.sign(t, c)
	id, err := v.Verify(context.Background(), tok)
	expectRejection(t, id, err, tok, Invalid, "expired", "token expired at 2026-01-02T03:04:05Z")
}

// TestIdentityClaimsJSON: the claims go to Postgres as JSON, so numbers must
// keep their exact text (no 1.7e+09 for exp, no rounding of big ids) and
// booleans must stay booleans.
func TestIdentityClaimsJSON(t *testing.T) {
	ti := newTestIssuer(t)
	cfg := ti.baseConfig()
	cfg.TokenUse = "id"
	v := ti.start(t, cfg)
	tok := mint(t, ti.Issuer, devissuer.TokenRequest{
		Subject:  "user-1",
		TokenUse: "id",
		Groups:   []string{"admin", "staff"},
		Extra: map[string]any{
			"big":    json.Number("12345678901234567891"),
			"ratio":  json.Number("0.1000000000000000055511151231257827"),
			"tenant": map[string]any{"id": json.Number("9007199254740993"), "name": "a<b>&c"},
		},
	})
	id, err := v.Verify(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	js := id.ClaimsJSON
	for _, want := range []string{
		`"email_verified":true`,
		`"big":12345678901234567891`,
		`"ratio":0.1000000000000000055511151231257827`,
		`"id":9007199254740993`,
		`"cognito:groups":["admin","staff"]`,
		`"token_use":"id"`,
		`"aud":"` + devissuer.ClientID + `"`,
		fmt.Sprintf(`"exp":%d`, id.ExpiresAt.Unix()),
	} {
		if !strings.Contains(js, want) {
			t.Errorf("ClaimsJSON lacks %s:\n%s", want, js)
		}
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, []byte(js)); err != nil || compact.String() != js {
		t.Errorf("ClaimsJSON is not compact JSON (%v): %s", err, js)
	}
	var decoded map[string]any
	if err := json.Unmarshal([]byte(js), &decoded); err != nil {
		t.Fatalf("ClaimsJSON is not JSON: %v", err)
	}
	if decoded["tenant"].(map[string]any)["name"] != "a<b>&c" {
		t.Errorf("string claim changed: %v", decoded["tenant"])
	}
	if id.Subject != "user-1" || id.Claims["sub"] != "user-1" {
		t.Errorf("subject %q / %v", id.Subject, id.Claims["sub"])
	}
	if _, ok := id.Claims["exp"].(json.Number); !ok {
		t.Errorf("Claims exp is %T, want json.Number", id.Claims["exp"])
	}
	if got := time.Until(id.ExpiresAt); got < 59*time.Minute || got > time.Hour {
		t.Errorf("ExpiresAt in %v, want about an hour", got)
	}
}

// TestKeyRotation: the issuer publishes a new key after the verifier loaded
// the set. The first token signed with it makes the verifier refetch at once
// rather than at the next periodic refresh (an hour away). The issuer answers
// slowly, like a real one across the network: a refetch that is cancelled by
// the rate limiter's short wait bound would never complete.
func TestKeyRotation(t *testing.T) {
	ti := newTestIssuer(t, newECKey(t))
	ti.delay.Store(int64(20 * time.Millisecond))
	cfg := ti.baseConfig()
	cfg.RefreshInterval = time.Hour
	cfg.UnknownKeyInterval = time.Hour
	v := ti.start(t, cfg)
	before := ti.fetches.Load()

	newKid, err := ti.AddKey(newECKey(t))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ti.Sign(ti.accessClaims(time.Now()), newKid)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("token of the rotated-in key refused: %v", err)
	}
	if n := ti.fetches.Load() - before; n != 1 {
		t.Errorf("%d JWKS fetches for the new key, want 1", n)
	}
	// The new key is now known: more tokens cost no fetch.
	for range 5 {
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Fatal(err)
		}
	}
	if n := ti.fetches.Load() - before; n != 1 {
		t.Errorf("%d JWKS fetches after reuse, want 1", n)
	}
}

// TestUnknownKidFlood: tokens with random key ids must not turn the proxy into
// an amplifier against the issuer (at most one fetch per UnknownKeyInterval)
// nor hold connections waiting for the rate limiter.
func TestUnknownKidFlood(t *testing.T) {
	const interval = 200 * time.Millisecond
	ti := newTestIssuer(t, newECKey(t))
	ti.delay.Store(int64(5 * time.Millisecond))
	cfg := ti.baseConfig()
	cfg.RefreshInterval = time.Hour
	cfg.UnknownKeyInterval = interval
	v := ti.start(t, cfg)
	before := ti.fetches.Load()
	attacker := newECKey(t)
	claims := ti.accessClaims(time.Now())

	var (
		wg       sync.WaitGroup
		slowest  atomic.Int64
		verified atomic.Int64
	)
	start := time.Now()
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Since(start) < 3*interval; i++ {
				kid := fmt.Sprintf("flood-%d-%d", w, i)
				tok := forge(t, jwt.SigningMethodES256, attacker, map[string]any{"kid": kid}, claims)
				t0 := time.Now()
				_, err := v.Verify(context.Background(), tok)
				d := time.Since(t0)
				for old := slowest.Load(); int64(d) > old && !slowest.CompareAndSwap(old, int64(d)); old = slowest.Load() {
				}
				var e *Error
				if !errors.As(err, &e) || e.Reason != "unknown_key" {
					t.Errorf("flood token %s: %v, want unknown_key", kid, err)
					return
				}
				verified.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	fetches := ti.fetches.Load() - before
	// One token of burst, then one per interval.
	limit := int64(elapsed/interval) + 1
	t.Logf("%d tokens in %v: %d JWKS fetches (limit %d), slowest Verify %v",
		verified.Load(), elapsed, fetches, limit, time.Duration(slowest.Load()))
	if fetches > limit {
		t.Errorf("%d JWKS fetches in %v, want at most %d", fetches, elapsed, limit)
	}
	if fetches == 0 {
		t.Errorf("no refetch at all for unknown kids: a rotated key would never be picked up")
	}
	if s := time.Duration(slowest.Load()); s > time.Second {
		t.Errorf("slowest Verify took %v: an unknown kid must not wait for the rate limiter", s)
	}
	if verified.Load() < 50 {
		t.Errorf("only %d tokens checked in %v", verified.Load(), elapsed)
	}
}

// TestReadiness: while the JWKS endpoint fails the verifier is not ready and
// refuses tokens as Unavailable (the client may retry), naming the issuer;
// once the endpoint answers, it becomes ready without a restart.
func TestReadiness(t *testing.T) {
	ti := newTestIssuer(t)
	ti.failing.Store(true)
	var okFetches, badFetches atomic.Int64
	cfg := ti.baseConfig()
	cfg.RefreshInterval = 20 * time.Millisecond
	cfg.UnknownKeyInterval = time.Hour
	cfg.OnFetch = func(ok bool) {
		if ok {
			okFetches.Add(1)
		} else {
			badFetches.Add(1)
		}
	}
	v := startVerifier(t, cfg)
	waitFor(t, "a failed fetch", func() bool { return badFetches.Load() > 0 })
	ctx := context.Background()
	if v.Ready(ctx) {
		t.Fatal("ready while the JWKS endpoint answers 500")
	}
	tok := mint(t, ti.Issuer, devissuer.TokenRequest{Subject: "user-1"})
	for range 3 { // the first one may trigger a fetch, the others must not wait
		id, err := v.Verify(ctx, tok)
		expectRejection(t, id, err, tok, Unavailable, "keys_unavailable",
			"keys of issuer "+ti.URL+" are not loaded yet (JWKS at "+ti.URL+"/.well-known/jwks.json): try again shortly")
	}
	if okFetches.Load() != 0 {
		t.Errorf("OnFetch reported %d good fetches from a failing endpoint", okFetches.Load())
	}

	ti.failing.Store(false)
	waitFor(t, "readiness after the endpoint recovered", func() bool { return v.Ready(ctx) })
	if _, err := v.Verify(ctx, tok); err != nil {
		t.Fatalf("rejected once ready: %v", err)
	}
	if okFetches.Load() == 0 {
		t.Error("OnFetch never reported a good fetch")
	}

	// A later outage keeps the keys already loaded.
	ti.failing.Store(true)
	failedBefore := badFetches.Load()
	waitFor(t, "failed refreshes", func() bool { return badFetches.Load() >= failedBefore+2 })
	if !v.Ready(ctx) {
		t.Error("an outage of the JWKS endpoint dropped the keys already loaded")
	}
	if _, err := v.Verify(ctx, tok); err != nil {
		t.Errorf("rejected during an outage with keys loaded: %v", err)
	}
}

// TestReadinessRetriesSoonerThanRefresh: after a failed first fetch the
// verifier must not stay unready for a whole RefreshInterval (an hour by
// default) when nobody sends a token to trigger a refetch.
func TestReadinessRetriesSoonerThanRefresh(t *testing.T) {
	ti := newTestIssuer(t)
	ti.failing.Store(true)
	cfg := ti.baseConfig()
	cfg.RefreshInterval = time.Hour
	cfg.UnknownKeyInterval = time.Hour
	v := startVerifier(t, cfg)
	waitFor(t, "a failed fetch", func() bool { return ti.fetches.Load() > 0 })
	ti.failing.Store(false)
	waitFor(t, "the retry", func() bool { return v.Ready(context.Background()) })
}

// TestVerifyBeforeFirstFetch: New returns before the keys are loaded; a token
// arriving in that moment waits for the fetch instead of being refused.
func TestVerifyBeforeFirstFetch(t *testing.T) {
	ti := newTestIssuer(t)
	ti.delay.Store(int64(300 * time.Millisecond))
	tok := mint(t, ti.Issuer, devissuer.TokenRequest{Subject: "user-1"})
	cfg := ti.baseConfig()
	t0 := time.Now()
	v := startVerifier(t, cfg)
	if d := time.Since(t0); d > 250*time.Millisecond {
		t.Errorf("New took %v: it must not wait for the issuer", d)
	}
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("token checked during the first fetch refused: %v", err)
	}
}

// TestVerifyHonoursContext: a caller that gives up is not held by a slow issuer.
func TestVerifyHonoursContext(t *testing.T) {
	ti := newTestIssuer(t)
	v := ti.start(t, ti.baseConfig())
	ti.delay.Store(int64(2 * time.Second))
	kid, err := ti.AddKey(newECKey(t))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ti.Sign(ti.accessClaims(time.Now()), kid)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	id, err := v.Verify(ctx, tok)
	if d := time.Since(t0); d > time.Second {
		t.Errorf("Verify took %v after its context ended", d)
	}
	expectRejection(t, id, err, tok, Invalid, "unknown_key", "is not published by issuer")
}

func TestNewConfigErrors(t *testing.T) {
	ti := newTestIssuer(t)
	jwks := ti.URL + "/.well-known/jwks.json"
	cognito := CognitoIssuer("eu-west-1", "eu-west-1_AbCdEf")
	tests := []struct {
		name string
		cfg  Config
		err  string // empty: accepted
	}{
		{"no issuer", Config{}, "no issuer configured: set --cognito-region and --cognito-user-pool-id, or --issuer"},
		{"issuer not a URL", Config{Rules: Rules{Issuer: "cognito"}}, `issuer "cognito" is not a URL`},
		{"plain http issuer", Config{Rules: Rules{Issuer: "http://issuer.example.com"}}, "issuer http://issuer.example.com must use https (plain http is allowed for loopback only)"},
		{"plain http JWKS", Config{Rules: Rules{Issuer: "https://issuer.example.com"}, JWKSURL: "http://issuer.example.com/jwks"}, "JWKS URL http://issuer.example.com/jwks must use https"},
		{"ftp issuer", Config{Rules: Rules{Issuer: "ftp://issuer.example.com"}}, "issuer ftp://issuer.example.com must use https"},
		{"http on a name that merely starts with localhost", Config{Rules: Rules{Issuer: "http://localhost.example.com"}}, "must use https"},
		{"loopback http issuer", Config{Rules: Rules{Issuer: ti.URL}}, ""},
		{"localhost http issuer", Config{Rules: Rules{Issuer: "http://localhost:1"}, JWKSURL: jwks}, ""},
		{"IPv6 loopback http issuer", Config{Rules: Rules{Issuer: "http://[::1]:1"}, JWKSURL: jwks}, ""},
		{"https issuer, loopback JWKS", Config{Rules: Rules{Issuer: "https://issuer.example.com"}, JWKSURL: jwks}, ""},
		{"Cognito without client ids", Config{Rules: Rules{Issuer: cognito, Cognito: true}, JWKSURL: jwks}, "--client-id is required with a Cognito user pool"},
		{"Cognito with client ids", Config{Rules: Rules{Issuer: cognito, Cognito: true, ClientIDs: []string{"abc"}}, JWKSURL: jwks}, ""},
		{"bad token use", Config{Rules: Rules{Issuer: ti.URL, TokenUse: "refresh"}}, `--token-use must be access, id or any, not "refresh"`},
		{"token use any", Config{Rules: Rules{Issuer: ti.URL, TokenUse: "any"}}, ""},
		{"negative leeway", Config{Rules: Rules{Issuer: ti.URL, Leeway: -time.Second}}, "--leeway must be between 0 and 5m0s, not -1s"},
		{"huge leeway", Config{Rules: Rules{Issuer: ti.URL, Leeway: 24 * time.Hour}}, "--leeway must be between 0 and 5m0s, not 24h0m0s"},
		{"largest leeway", Config{Rules: Rules{Issuer: ti.URL, Leeway: 5 * time.Minute}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, err := New(context.Background(), tc.cfg)
			if tc.err == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				v.Close()
				return
			}
			if err == nil {
				v.Close()
				t.Fatalf("accepted, want error %q", tc.err)
			}
			if !strings.Contains(err.Error(), tc.err) {
				t.Errorf("error %q, want %q", err, tc.err)
			}
		})
	}
}

// TestNewDefaults: the JWKS location and token_use default as documented.
func TestNewDefaults(t *testing.T) {
	ti := newTestIssuer(t)
	v := ti.start(t, Config{Rules: Rules{Issuer: ti.URL + "/"}})
	// The dev issuer publishes no discovery document: the conventional place.
	if v.keys.url != ti.URL+"/.well-known/jwks.json" {
		t.Errorf("JWKS URL %q", v.keys.url)
	}
	if v.cfg.TokenUse != "access" || v.cfg.MaxTokenBytes != DefaultMaxTokenBytes {
		t.Errorf("token use %q, max token bytes %d", v.cfg.TokenUse, v.cfg.MaxTokenBytes)
	}
	// An id token is refused by default: access is the default token_use.
	tok := mint(t, ti.Issuer, devissuer.TokenRequest{Subject: "u", TokenUse: "id"})
	id, err := v.Verify(context.Background(), tok)
	expectRejection(t, id, err, tok, NotAllowed, "token_use", "token_use id is not accepted: send the access token")
}

func TestCognitoIssuer(t *testing.T) {
	got := CognitoIssuer("eu-west-1", "eu-west-1_AbCdEf")
	if want := "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf"; got != want {
		t.Errorf("CognitoIssuer = %q, want %q", got, want)
	}
	tests := []struct {
		issuer string
		want   bool
	}{
		{got, true},
		{"https://cognito-idp.us-east-1.amazonaws.com/us-east-1_x", true},
		{"https://cognito-idp.us-east-1.amazonaws.com.evil.example/us-east-1_x", false},
		{"https://evil.example/cognito-idp.us-east-1.amazonaws.com", false},
		{"https://accounts.google.com", false},
		{"http://127.0.0.1:8080", false},
		{"not a url \x7f", false},
		{"", false},
	}
	for _, tc := range tests {
		if got := IsCognitoIssuer(tc.issuer); got != tc.want {
			t.Errorf("IsCognitoIssuer(%q) = %v, want %v", tc.issuer, got, tc.want)
		}
	}
}

func TestSafeText(t *testing.T) {
	tests := []struct{ in, want string }{
		{"kid-1", "kid-1"},
		{"a\nb\x00c\x7fd", "a?b?c?d"},
		{"\u202eevil", "?evil"}, // right-to-left override
		{strings.Repeat("x", 70), strings.Repeat("x", 64) + "..."},
		{strings.Repeat("x", 63) + "é" + "yyy", strings.Repeat("x", 63) + "..."},
	}
	for _, tc := range tests {
		if got := safeText(tc.in); got != tc.want {
			t.Errorf("safeText(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestJWKSRedirects: the key fetch follows redirects only where checkURL
// would allow the URL itself, so an https JWKS cannot be downgraded to
// plain http towards another host.
func TestJWKSRedirects(t *testing.T) {
	via := func(n int) []*http.Request { return make([]*http.Request, n) }
	req := func(raw string) *http.Request {
		r, err := http.NewRequest(http.MethodGet, raw, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	tests := []struct {
		target string
		hops   int
		ok     bool
	}{
		{"https://keys.example.com/jwks.json", 1, true},
		{"http://127.0.0.1:8080/jwks.json", 1, true},
		{"http://keys.example.com/jwks.json", 1, false},
		{"https://keys.example.com/jwks.json", 5, false},
	}
	for _, tc := range tests {
		err := checkRedirect(req(tc.target), via(tc.hops))
		if (err == nil) != tc.ok {
			t.Errorf("redirect to %s after %d hops: %v, want ok=%v", tc.target, tc.hops, err, tc.ok)
		}
	}

	// End to end: a loopback JWKS that redirects to another loopback server
	// works; one that redirects off loopback over http does not.
	ti := newTestIssuer(t)
	moved := httptest.NewServer(http.RedirectHandler(ti.URL+"/.well-known/jwks.json", http.StatusFound))
	defer moved.Close()
	cfg := ti.baseConfig()
	cfg.JWKSURL = moved.URL + "/jwks"
	ti.start(t, cfg)

	var failed atomic.Bool
	away := httptest.NewServer(http.RedirectHandler("http://192.0.2.1/jwks.json", http.StatusFound))
	defer away.Close()
	cfg.JWKSURL = away.URL + "/jwks"
	cfg.OnFetch = func(ok bool) {
		if !ok {
			failed.Store(true)
		}
	}
	v := startVerifier(t, cfg)
	waitFor(t, "the refused redirect", failed.Load)
	if v.Ready(context.Background()) {
		t.Error("ready with keys from a redirect to plain http")
	}
}

// TestJWKSDocuments: what the issuer publishes decides readiness. A broken
// document is a failed fetch; symmetric and unsupported keys are ignored, so
// a set of only those leaves the verifier unready rather than able to verify
// with them.
func TestJWKSDocuments(t *testing.T) {
	ec := newECKey(t)
	d, err := devissuer.New("", ec)
	if err != nil {
		t.Fatal(err)
	}
	good, err := d.JWKS(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(good, &set); err != nil {
		t.Fatal(err)
	}
	oct := `{"kty":"oct","kid":"hmac","k":"c2VjcmV0","alg":"HS256","use":"sig"}`
	okp := `{"kty":"OKP","crv":"X448","kid":"x448","x":"AAAA","use":"sig"}`
	tests := []struct {
		name  string
		body  string
		ready bool
	}{
		{"the dev issuer's set", string(good), true},
		{"with a symmetric and an unsupported key", `{"keys":[` + oct + `,` + okp + `,` + string(set.Keys[0]) + `]}`, true},
		{"only a symmetric key", `{"keys":[` + oct + `]}`, false},
		{"empty set", `{"keys":[]}`, false},
		{"not JSON", `<html>maintenance</html>`, false},
		{"a broken RSA key", `{"keys":[{"kty":"RSA","kid":"k","n":"!!","e":"AQAB"}]}`, false},
		{"huge", `{"keys":[],"pad":"` + strings.Repeat("x", 2<<20) + `"}`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			var fetched, ok atomic.Bool
			v := startVerifier(t, Config{
				Rules: Rules{Issuer: srv.URL},
				OnFetch: func(good bool) {
					ok.Store(good)
					fetched.Store(true)
				},
			})
			waitFor(t, "a fetch", fetched.Load)
			if got := v.Ready(context.Background()); got != tc.ready {
				t.Errorf("ready %v, want %v (fetch ok %v)", got, tc.ready, ok.Load())
			}
		})
	}
}

// TestDevIssuerRoundTrip: what `rlsproxy dev` mints, `rlsproxy serve` pointed
// at the dev issuer accepts, for both kinds of tokens and both key types.
func TestDevIssuerRoundTrip(t *testing.T) {
	ec := newECKey(t)
	ti := newTestIssuer(t, ec, issuerRSAKey())
	cfg := ti.baseConfig()
	cfg.TokenUse = "any"
	v := ti.start(t, cfg)
	for _, use := range []string{"access", "id"} {
		for _, kid := range ti.KeyIDs() {
			claims := jwt.MapClaims{
				"iss": ti.URL, "sub": "dave", "exp": time.Now().Add(time.Minute).Unix(),
				"token_use": use, "client_id": devissuer.ClientID, "aud": devissuer.ClientID,
			}
			tok, err := ti.Sign(claims, kid)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := v.Verify(context.Background(), tok); err != nil {
				t.Errorf("%s token signed with %s refused: %v", use, kid, err)
			}
		}
		tok := mint(t, ti.Issuer, devissuer.TokenRequest{Subject: "dave", TokenUse: use})
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Errorf("minted %s token refused: %v", use, err)
		}
	}
	// The first key signs by default: here the EC key.
}

// keysServer serves whatever body it holds at the issuer's JWKS path, and,
// if discovery is set, an OIDC discovery document naming another path.
type keysServer struct {
	*httptest.Server
	body      atomic.Pointer[[]byte]
	discovery atomic.Bool
	fetches   atomic.Int64
}

// newIssuerServer returns a dev issuer with a key of its own, published by
// a keysServer that is the issuer's URL, and the key set it publishes.
func newIssuerServer(t *testing.T) (*devissuer.Issuer, *keysServer, []byte) {
	t.Helper()
	d, err := devissuer.New("", newECKey(t))
	if err != nil {
		t.Fatal(err)
	}
	good := publishedKeys(t, d)
	ks := newKeysServer(t, good)
	d.URL = ks.URL
	return d, ks, good
}

// publishedKeys is the JWKS document d publishes.
func publishedKeys(t *testing.T, d *devissuer.Issuer) []byte {
	t.Helper()
	b, err := d.JWKS(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newKeysServer(t *testing.T, body []byte) *keysServer {
	ks := &keysServer{}
	ks.body.Store(&body)
	ks.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/.well-known/openid-configuration" && ks.discovery.Load():
			fmt.Fprintf(w, `{"issuer": %q, "jwks_uri": %q}`, ks.URL, ks.URL+"/oauth2/v3/certs")
		case r.URL.Path == "/.well-known/openid-configuration":
			http.NotFound(w, r)
		case r.URL.Path == "/oauth2/v3/certs" || (r.URL.Path == "/.well-known/jwks.json" && !ks.discovery.Load()):
			ks.fetches.Add(1)
			_, _ = w.Write(*ks.body.Load())
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(ks.Close)
	return ks
}

// A key set answered with 200 that is not one (an API gateway's or CDN's
// error body, an empty set) never replaces the last good keys: tokens keep
// verifying, the proxy stays ready, and the failures are logged, at most a
// line a minute with their count, then the recovery once.
func TestJWKSNeverWorseThanLastGood(t *testing.T) {
	d, ks, good := newIssuerServer(t)
	var logs syncBuffer
	var fetched atomic.Int64
	v := startVerifier(t, Config{Rules: Rules{Issuer: ks.URL}, RefreshInterval: time.Hour,
		Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
		OnFetch: func(bool) { fetched.Add(1) }})
	waitFor(t, "the keys", func() bool { return v.Ready(context.Background()) })
	tok := mint(t, d, devissuer.TokenRequest{Subject: "u"})
	for _, bad := range []string{`{"message": "Internal server error"}`, `{"keys": []}`, `{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}`, `[]`, `<html>busy</html>`} {
		b := []byte(bad)
		ks.body.Store(&b)
		n := fetched.Load()
		if err := v.keys.refresh(context.Background()); err == nil {
			t.Errorf("%s: the fetch succeeded", bad)
		}
		waitFor(t, "the fetch", func() bool { return fetched.Load() > n })
		if !v.Ready(context.Background()) {
			t.Errorf("%s: not ready any more", bad)
		}
		if _, err := v.verify(context.Background(), tok); err != nil {
			t.Errorf("%s: the token is refused: %v", bad, err)
		}
	}
	if got := strings.Count(logs.String(), "issuer keys not fetched"); got != 1 {
		t.Errorf("%d lines about failed fetches, want 1 (a minute apart):\n%s", got, logs.String())
	}
	ks.body.Store(&good)
	if err := v.keys.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "issuer keys fetched again") || !strings.Contains(logs.String(), "failed_fetches=5") {
		t.Errorf("no line about the recovery after 5 failures:\n%s", logs.String())
	}
}

// A token answered from the cache still needs its key published: once the
// issuer withdraws the key, its tokens are refused at the next refresh.
func TestCachedTokenNeedsPublishedKey(t *testing.T) {
	d, ks, _ := newIssuerServer(t)
	v := startVerifier(t, Config{Rules: Rules{Issuer: ks.URL}, RefreshInterval: time.Hour, UnknownKeyInterval: time.Hour})
	waitFor(t, "the keys", func() bool { return v.Ready(context.Background()) })
	tok := mint(t, d, devissuer.TokenRequest{Subject: "u"})
	for range 2 { // the second from the cache
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Fatal(err)
		}
	}
	other, err := devissuer.New("", newECKey(t))
	if err != nil {
		t.Fatal(err)
	}
	rotated := publishedKeys(t, other)
	ks.body.Store(&rotated)
	if err := v.keys.refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	id, err := v.Verify(context.Background(), tok)
	expectRejection(t, id, err, tok, Invalid, "unknown_key", "is not published by issuer")
}

// For an issuer other than Cognito, the keys are where its OIDC discovery
// document says (jwks_uri); the discovery and key documents are bounded.
func TestJWKSDiscoveryAndBounds(t *testing.T) {
	d, ks, _ := newIssuerServer(t)
	ks.discovery.Store(true)
	v := startVerifier(t, Config{Rules: Rules{Issuer: ks.URL}, RefreshInterval: time.Hour})
	waitFor(t, "the keys", func() bool { return v.Ready(context.Background()) })
	if v.keys.url != ks.URL+"/oauth2/v3/certs" {
		t.Errorf("keys fetched from %s", v.keys.url)
	}
	tok := mint(t, d, devissuer.TokenRequest{Subject: "u"})
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	huge := []byte(`{"keys":[],"pad":"` + strings.Repeat("x", 64<<10) + `"}`)
	ks.body.Store(&huge)
	if err := v.keys.refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "larger than 64 KiB") {
		t.Errorf("a 64 KiB document: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
