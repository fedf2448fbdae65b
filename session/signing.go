package session

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// SignatureSetting carries the signature of the claims: the database's
// auth.* functions (see `rlsproxy sql`) verify it, so that a claims setting
// forged, edited or copied from another session yields an error or NULL.
const SignatureSetting = "rlsproxy.claims_signature"

// minSigningKey is the least secret length accepted, in bytes.
const minSigningKey = 32

// Signer signs claims for one upstream backend with HMAC-SHA256.
type Signer struct{ key []byte }

// LoadSigner reads the shared secret from path; surrounding whitespace is
// trimmed (so `openssl rand -hex 32 > key` works).
func LoadSigner(path string) (*Signer, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--signing-key-file: %w", err)
	}
	return NewSigner([]byte(strings.TrimSpace(string(raw))))
}

// NewSigner returns a Signer for the secret key.
func NewSigner(key []byte) (*Signer, error) {
	if len(key) < minSigningKey {
		return nil, fmt.Errorf("signing key has %d bytes, at least %d are needed (e.g. openssl rand -hex 32)", len(key), minSigningKey)
	}
	if len(key) > 1024 {
		return nil, errors.New("signing key is longer than 1024 bytes")
	}
	return &Signer{key: key}, nil
}

// Sign returns the hex HMAC-SHA256 of "<pid>.<claims>": bound to the backend,
// so a signature copied to another session does not verify there.
func (s *Signer) Sign(pid uint32, claims string) string {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(strconv.FormatUint(uint64(pid), 10)))
	m.Write([]byte{'.'})
	m.Write([]byte(claims))
	return hex.EncodeToString(m.Sum(nil))
}

// Pads returns the HMAC inner and outer pads of the key (RFC 2104), which
// the database stores so that plain sha256() can verify: HMAC(k, m) =
// sha256(opad || sha256(ipad || m)).
func (s *Signer) Pads() (ipad, opad []byte) {
	k := s.key
	if len(k) > sha256.BlockSize {
		sum := sha256.Sum256(k)
		k = sum[:]
	}
	ipad = make([]byte, sha256.BlockSize)
	opad = make([]byte, sha256.BlockSize)
	copy(ipad, k)
	copy(opad, k)
	for i := range ipad {
		ipad[i] ^= 0x36
		opad[i] ^= 0x5c
	}
	return ipad, opad
}
