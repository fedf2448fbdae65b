package devissuer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
)

// keyPEMType marks a key file written by `rlsproxy dev`. `rlsproxy token`
// signs only with keys of this type, so it cannot mint tokens for a real issuer.
const keyPEMType = "RLSPROXY DEV PRIVATE KEY"

// ClientID is the app client id of the dev issuer's tokens.
const ClientID = "rlsproxy-dev"

// Issuer is a local, Cognito-shaped token issuer: it publishes its keys as
// a JWKS over HTTP and mints tokens. It backs `rlsproxy dev`, `rlsproxy token`
// and the tests; it is never part of `rlsproxy serve`.
type Issuer struct {
	URL      string // the iss of its tokens; JWKS at URL/.well-known/jwks.json
	ClientID string

	mu   sync.Mutex
	keys []issuerKey // keys[0] signs by default
}

type issuerKey struct {
	kid    string
	alg    string
	signer crypto.Signer
}

// New returns an issuer at url publishing the given keys (RSA or P-256).
func New(url string, keys ...crypto.Signer) (*Issuer, error) {
	d := &Issuer{URL: url, ClientID: ClientID}
	for _, k := range keys {
		if _, err := d.AddKey(k); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// AddKey publishes another key and returns its key id.
func (d *Issuer) AddKey(k crypto.Signer) (string, error) {
	var alg string
	switch k.(type) {
	case *rsa.PrivateKey:
		alg = "RS256"
	case *ecdsa.PrivateKey:
		alg = "ES256"
	default:
		return "", fmt.Errorf("dev issuer: unsupported key type %T", k)
	}
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	kid := base64.RawURLEncoding.EncodeToString(sum[:12])
	d.mu.Lock()
	d.keys = append(d.keys, issuerKey{kid: kid, alg: alg, signer: k})
	d.mu.Unlock()
	return kid, nil
}

// KeyIDs lists the published key ids, the default signer first.
func (d *Issuer) KeyIDs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := make([]string, len(d.keys))
	for i, k := range d.keys {
		ids[i] = k.kid
	}
	return ids
}

// JWKS returns the public key set as JSON.
func (d *Issuer) JWKS(ctx context.Context) ([]byte, error) {
	store := jwkset.NewMemoryStorage()
	d.mu.Lock()
	keys := append([]issuerKey(nil), d.keys...)
	d.mu.Unlock()
	for _, k := range keys {
		jwk, err := jwkset.NewJWKFromKey(k.signer.Public(), jwkset.JWKOptions{
			Metadata: jwkset.JWKMetadataOptions{KID: k.kid, ALG: jwkset.ALG(k.alg), USE: jwkset.UseSig},
		})
		if err != nil {
			return nil, err
		}
		if err := store.KeyWrite(ctx, jwk); err != nil {
			return nil, err
		}
	}
	return store.JSONPublic(ctx)
}

// ServeHTTP serves the JWKS at /.well-known/jwks.json.
func (d *Issuer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/.well-known/jwks.json" {
		http.NotFound(w, r)
		return
	}
	js, err := d.JWKS(r.Context())
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(js)
}

// TokenRequest describes a token to mint.
type TokenRequest struct {
	Subject  string
	Groups   []string      // cognito:groups
	TTL      time.Duration // default one hour
	TokenUse string        // "access" (default) or "id"
	Extra    map[string]any
}

// Mint signs a Cognito-shaped token with the default key.
func (d *Issuer) Mint(req TokenRequest) (string, error) {
	if req.Subject == "" {
		return "", errors.New("a token needs a subject (--sub)")
	}
	if req.TTL == 0 {
		req.TTL = time.Hour
	}
	now := time.Now()
	claims := jwt.MapClaims{
		"iss":       d.URL,
		"sub":       req.Subject,
		"iat":       now.Unix(),
		"exp":       now.Add(req.TTL).Unix(),
		"auth_time": now.Unix(),
		"jti":       rand.Text(),
	}
	switch req.TokenUse {
	case "", "access":
		claims["token_use"] = "access"
		claims["client_id"] = d.ClientID
		claims["username"] = req.Subject
		claims["scope"] = "aws.cognito.signin.user.admin"
	case "id":
		claims["token_use"] = "id"
		claims["aud"] = d.ClientID
		claims["cognito:username"] = req.Subject
		claims["email_verified"] = true
	default:
		return "", fmt.Errorf("token_use must be access or id, not %q", req.TokenUse)
	}
	if len(req.Groups) > 0 {
		claims["cognito:groups"] = req.Groups
	}
	for k, v := range req.Extra {
		claims[k] = v
	}
	return d.Sign(claims, "")
}

// Sign signs arbitrary claims with the key kid (the default key when empty).
func (d *Issuer) Sign(claims jwt.Claims, kid string) (string, error) {
	d.mu.Lock()
	var key *issuerKey
	for i := range d.keys {
		if kid == "" || d.keys[i].kid == kid {
			key = &d.keys[i]
			break
		}
	}
	d.mu.Unlock()
	if key == nil {
		return "", fmt.Errorf("dev issuer has no key %q", kid)
	}
	tok := jwt.NewWithClaims(jwt.GetSigningMethod(key.alg), claims)
	tok.Header["kid"] = key.kid
	return tok.SignedString(key.signer)
}

// LoadOrCreateKey reads the dev RSA key at path, creating it (mode 0600)
// when it does not exist.
func LoadOrCreateKey(path string) (*rsa.PrivateKey, error) {
	k, err := LoadKey(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return k, err
	}
	k, err = rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	data := pem.EncodeToMemory(&pem.Block{Type: keyPEMType, Bytes: der})
	// Written whole to a temporary file, then linked into place: link fails
	// when path exists, so when two processes start at once the second loads
	// the key of the first instead of overwriting it (the first would then
	// mint tokens with a key nobody publishes), and nobody reads a half-written
	// file.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".dev-key-*.tmp") // mode 0600
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	if err := os.Link(tmp.Name(), path); errors.Is(err, os.ErrExist) {
		return LoadKey(path)
	} else if err != nil {
		return nil, err
	}
	return k, nil
}

// LoadKey reads a key written by LoadOrCreateKey and refuses any other.
func LoadKey(path string) (*rsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != keyPEMType {
		return nil, fmt.Errorf("%s is not an rlsproxy dev key: tokens are minted only with the key of `rlsproxy dev`", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: dev key is not RSA", path)
	}
	return rk, nil
}
