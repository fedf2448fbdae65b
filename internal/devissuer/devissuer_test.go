package devissuer

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// rsaKey is one RSA key for the whole package's tests: generating one costs
// tens of milliseconds.
var rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

func newECKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mint(t testing.TB, d *Issuer, req TokenRequest) string {
	t.Helper()
	tok, err := d.Mint(req)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestLoadOrCreateDevKey: the first run creates a private key only its owner
// can read; later runs (and `rlsproxy token`) load the same key.
func TestLoadOrCreateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev-key.pem")
	created, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if runtime.GOOS != "windows" {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if perm := st.Mode().Perm(); perm != 0o600 {
			t.Errorf("key file mode %o, want 600", perm)
		}
	}
	again, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !created.Equal(again) || !created.Equal(loaded) {
		t.Error("reloading the dev key gave another key")
	}
	// No temporary file is left next to the key.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the key", len(entries))
	}
}

// TestLoadOrCreateDevKeyConcurrent: two `rlsproxy dev` starting at once must
// end up with one key, or one of them would mint tokens nobody can verify.
func TestLoadOrCreateKeyConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev-key.pem")
	const n = 3
	var wg sync.WaitGroup
	keys := make([][]byte, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := LoadOrCreateKey(path)
			errs[i] = err
			if err == nil {
				keys[i] = x509.MarshalPKCS1PrivateKey(k)
			}
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if !slices.Equal(keys[i], keys[0]) {
			t.Errorf("caller %d got another key than caller 0", i)
		}
	}
	onDisk, err := LoadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(x509.MarshalPKCS1PrivateKey(onDisk), keys[0]) {
		t.Error("the key on disk is not the one returned")
	}
}

// TestLoadDevKeyRefusesOtherKeys: `rlsproxy token` signs only with the dev
// key, so that it cannot be pointed at a real issuer's private key.
func TestLoadKeyRefusesOtherKeys(t *testing.T) {
	rsaKey := rsaKey()
	pkcs8, err := x509.MarshalPKCS8PrivateKey(rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	ec := newECKey(t)
	ecPKCS8, err := x509.MarshalPKCS8PrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	ecDER, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	pemOf := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }

	tests := []struct {
		name string
		data []byte
		msg  string
	}{
		{"PKCS#8 PRIVATE KEY", pemOf("PRIVATE KEY", pkcs8), "is not an rlsproxy dev key: tokens are minted only with the key of `rlsproxy dev`"},
		{"PKCS#1 RSA PRIVATE KEY", pemOf("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaKey)), "is not an rlsproxy dev key"},
		{"EC PRIVATE KEY", pemOf("EC PRIVATE KEY", ecDER), "is not an rlsproxy dev key"},
		{"a certificate before the dev key", append(pemOf("CERTIFICATE", []byte{1}), pemOf(keyPEMType, pkcs8)...), "is not an rlsproxy dev key"},
		{"not PEM", []byte("-----BEGIN nothing"), "is not an rlsproxy dev key"},
		{"empty file", nil, "is not an rlsproxy dev key"},
		{"dev type around an EC key", pemOf(keyPEMType, ecPKCS8), "dev key is not RSA"},
		{"dev type around garbage", pemOf(keyPEMType, []byte("garbage")), "key.pem: "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "key.pem")
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			k, err := LoadKey(path)
			if err == nil {
				t.Fatalf("loaded a key that is not a dev key (%d bits)", k.N.BitLen())
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q, want %q", err, tc.msg)
			}
			// LoadOrCreateKey must refuse it too, not overwrite it.
			if _, err := LoadOrCreateKey(path); err == nil {
				t.Error("LoadOrCreateKey accepted or replaced a foreign key file")
			}
			if after, _ := os.ReadFile(path); !slices.Equal(after, tc.data) {
				t.Error("the foreign key file was changed")
			}
		})
	}

	// A missing file is reported as such, so the CLI can say "run rlsproxy dev first".
	_, err = LoadKey(filepath.Join(t.TempDir(), "none.pem"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing key file: %v, want ErrNotExist", err)
	}
}

// parseUnverified reads the claims of a token the test just minted; the
// signature is checked by the Verifier tests.
func parseUnverified(t *testing.T, tok string) (map[string]any, map[string]any) {
	t.Helper()
	claims := jwt.MapClaims{}
	parsed, _, err := jwt.NewParser(jwt.WithJSONNumber()).ParseUnverified(tok, claims)
	if err != nil {
		t.Fatal(err)
	}
	return parsed.Header, claims
}

func TestMint(t *testing.T) {
	d, err := New("http://127.0.0.1:9999", rsaKey())
	if err != nil {
		t.Fatal(err)
	}
	kid := d.KeyIDs()[0]

	t.Run("access token defaults", func(t *testing.T) {
		before := time.Now().Unix()
		hdr, c := parseUnverified(t, mint(t, d, TokenRequest{Subject: "alice"}))
		if hdr["alg"] != "RS256" || hdr["kid"] != kid {
			t.Errorf("header %v", hdr)
		}
		for k, want := range map[string]any{
			"iss": "http://127.0.0.1:9999", "sub": "alice", "token_use": "access",
			"client_id": ClientID, "username": "alice", "scope": "aws.cognito.signin.user.admin",
		} {
			if c[k] != want {
				t.Errorf("%s = %v, want %v", k, c[k], want)
			}
		}
		for _, absent := range []string{"cognito:groups", "aud", "email_verified"} {
			if _, ok := c[absent]; ok {
				t.Errorf("access token has %s: %v", absent, c[absent])
			}
		}
		iat, _ := c["iat"].(json.Number).Int64()
		exp, _ := c["exp"].(json.Number).Int64()
		if iat < before || iat > time.Now().Unix() || exp-iat != 3600 {
			t.Errorf("iat %d exp %d: want now and now+1h", iat, exp)
		}
		if jti, _ := c["jti"].(string); jti == "" {
			t.Error("no jti")
		}
	})

	t.Run("groups, ttl, extra", func(t *testing.T) {
		_, c := parseUnverified(t, mint(t, d, TokenRequest{
			Subject: "bob", Groups: []string{"admin", "staff"}, TTL: 5 * time.Minute,
			Extra: map[string]any{"tenant": "t1", "client_id": "override"},
		}))
		if g, _ := c["cognito:groups"].([]any); len(g) != 2 || g[0] != "admin" || g[1] != "staff" {
			t.Errorf("cognito:groups = %v", c["cognito:groups"])
		}
		iat, _ := c["iat"].(json.Number).Int64()
		exp, _ := c["exp"].(json.Number).Int64()
		if exp-iat != 300 {
			t.Errorf("ttl %ds, want 300", exp-iat)
		}
		if c["tenant"] != "t1" || c["client_id"] != "override" {
			t.Errorf("extra claims not applied: %v", c)
		}
	})

	t.Run("id token", func(t *testing.T) {
		_, c := parseUnverified(t, mint(t, d, TokenRequest{Subject: "carol", TokenUse: "id"}))
		for k, want := range map[string]any{
			"token_use": "id", "aud": ClientID, "cognito:username": "carol", "email_verified": true,
		} {
			if c[k] != want {
				t.Errorf("%s = %v (%T), want %v", k, c[k], c[k], want)
			}
		}
		if _, ok := c["client_id"]; ok {
			t.Error("id token has client_id")
		}
	})

	t.Run("errors", func(t *testing.T) {
		if _, err := d.Mint(TokenRequest{}); err == nil || !strings.Contains(err.Error(), "needs a subject (--sub)") {
			t.Errorf("no subject: %v", err)
		}
		if _, err := d.Mint(TokenRequest{Subject: "a", TokenUse: "refresh"}); err == nil || !strings.Contains(err.Error(), `token_use must be access or id, not "refresh"`) {
			t.Errorf("bad token_use: %v", err)
		}
		if _, err := d.Sign(jwt.MapClaims{"sub": "a"}, "no-such-kid"); err == nil {
			t.Error("signed with a key the issuer does not have")
		}
		empty, _ := New("http://127.0.0.1:1")
		if _, err := empty.Mint(TokenRequest{Subject: "a"}); err == nil {
			t.Error("an issuer without keys minted a token")
		}
	})
}

// TestDevIssuerJWKS: the issuer publishes every key, public parts only, with
// the kid and alg that its tokens carry.
func TestJWKS(t *testing.T) {
	ec := newECKey(t)
	d, err := New("", rsaKey(), ec)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(d)
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/.well-known/jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		t.Fatal(err)
	}
	ids := d.KeyIDs()
	if len(set.Keys) != 2 || len(ids) != 2 || ids[0] == ids[1] {
		t.Fatalf("JWKS %s, key ids %v", body, ids)
	}
	want := map[string][2]string{ids[0]: {"RSA", "RS256"}, ids[1]: {"EC", "ES256"}}
	for _, k := range set.Keys {
		w, ok := want[k["kid"].(string)]
		if !ok || k["kty"] != w[0] || k["alg"] != w[1] || k["use"] != "sig" {
			t.Errorf("published key %v, want kid in %v", k, ids)
		}
		for _, private := range []string{"d", "p", "q", "dp", "dq", "qi"} {
			if _, ok := k[private]; ok {
				t.Errorf("JWKS publishes private parameter %q", private)
			}
		}
	}

	resp, err = http.Get(srv.URL + "/other")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /other: %d, want 404", resp.StatusCode)
	}

	// The key id derives from the public key: stable across restarts.
	d2, _ := New("", rsaKey())
	if d2.KeyIDs()[0] != ids[0] {
		t.Error("the same key got another kid")
	}

	// Only RSA and P-256 keys can be published.
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	if _, err := d.AddKey(edKey); err == nil || !strings.Contains(err.Error(), "unsupported key type") {
		t.Errorf("AddKey(ed25519): %v", err)
	}
	if _, err := New("", edKey); err == nil {
		t.Error("New accepted an ed25519 key")
	}
}
