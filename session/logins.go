package session

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
)

// With a signing key, the proxy logs in to the database as one login role
// per mapped role, each a member of its mapped role only: a session for role
// R can then reach no role but R and its own login, which holds no privilege,
// whatever SQL runs in it (a RESET ROLE, SET ROLE to another mapped role,
// SET SESSION AUTHORIZATION, DISCARD ALL, set_config('role', ...)). The
// database enforces the role; the guard is a second wall, not the only one.
//
// The operator keeps one secret, as before: the logins' passwords are derived
// from the signing key, which `rlsproxy sql --signing-key-file` and
// `rlsproxy serve --signing-key-file` both read, so the SQL can set them (as
// SCRAM verifiers: the password itself never appears) and the proxy can log
// in with them.

// LoginFor names the login role that serves mapped role role, for the
// --upstream user login: "<login>_<role>", shortened with a hash when that
// is longer than PostgreSQL's 63-byte names.
func LoginFor(login, role string) string {
	name := login + "_" + role
	if len(name) <= 63 {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return name[:54] + "_" + hex.EncodeToString(sum[:4])
}

// LoginPassword is the password of login role name, derived from the key.
func (s *Signer) LoginPassword(name string) string {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte("rlsproxy login password\x00"))
	m.Write([]byte(name))
	return hex.EncodeToString(m.Sum(nil))
}

// scramIterations is PostgreSQL's default for SCRAM-SHA-256 verifiers.
const scramIterations = 4096

// LoginVerifier is the SCRAM-SHA-256 verifier of login role name's
// password, as PostgreSQL stores it (RFC 5802, RFC 7677): what `rlsproxy
// sql` sets with ALTER ROLE ... PASSWORD, so the password never appears in
// the SQL. Each call draws a new salt.
func (s *Signer) LoginVerifier(name string) (string, error) {
	var salt [16]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return "", err
	}
	salted, err := pbkdf2.Key(sha256.New, s.LoginPassword(name), salt[:], scramIterations, sha256.Size)
	if err != nil {
		return "", err
	}
	mac := func(key []byte, msg string) []byte {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(msg))
		return m.Sum(nil)
	}
	clientKey := mac(salted, "Client Key")
	storedKey := sha256.Sum256(clientKey)
	serverKey := mac(salted, "Server Key")
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", scramIterations, b64(salt[:]), b64(storedKey[:]), b64(serverKey)), nil
}
