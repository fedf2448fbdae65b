package auth

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
)

// FuzzVerify feeds arbitrary passwords to Verify against a real JWKS. Verify
// must never panic, never accept a token it was not given signed, and always
// answer with an *Error whose message is short, valid UTF-8 and free of the
// token's signature.
//
//	go test -run '^$' -fuzz FuzzVerify ./auth/
func FuzzVerify(f *testing.F) {
	now := time.Now()
	ec := newECKey(f)
	ti := newTestIssuer(f, issuerRSAKey(), ec)
	cfg := ti.baseConfig()
	cfg.TokenUse = "any"
	cfg.UnknownKeyInterval = time.Hour // random kids must not hammer the test server
	cfg.Now = func() time.Time { return now }
	v := ti.start(f, cfg)
	ids := ti.KeyIDs()

	claims := ti.accessClaims(now)
	rsaTok := ti.sign(f, claims)
	ecTok, err := ti.Sign(claims, ids[1])
	if err != nil {
		f.Fatal(err)
	}
	// Only these header.payload pairs carry a real signature. A mutation of
	// the signature segment alone may still decode to the same bytes.
	signed := []string{prefixOf(rsaTok), prefixOf(ecTok)}

	expired := ti.accessClaims(now.Add(-2 * time.Hour))
	idClaims := ti.accessClaims(now)
	idClaims["token_use"], idClaims["aud"] = "id", "someone-else"
	delete(idClaims, "client_id")
	seeds := []string{
		rsaTok,
		ecTok,
		ti.sign(f, expired),
		ti.sign(f, idClaims),
		forge(f, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, nil, claims),
		forge(f, jwt.SigningMethodHS256, []byte("secret"), map[string]any{"kid": ids[0]}, claims),
		forge(f, jwt.SigningMethodES256, ec, map[string]any{"kid": ids[0]}, claims),
		b64(`{"alg":"RS256","kid":"\u202e\u0000`+strings.Repeat("é", 40)+`"}`) + "." + b64(`{}`) + ".c2ln",
		b64(`{"alg":"RS256"}`) + "." + b64(`{"exp":1e999,"sub":{}}`) + ".",
		"",
		".",
		"..",
		"a.b.c",
		"eyJ.eyJ.eyJ",
		"correct horse battery staple",
		strings.Repeat("A", DefaultMaxTokenBytes+1),
	}
	for _, s := range seeds {
		f.Add(s)
	}

	f.Fuzz(func(t *testing.T, token string) {
		id, err := v.Verify(context.Background(), token)
		if err == nil {
			for _, p := range signed {
				if strings.HasPrefix(token, p) {
					return
				}
			}
			t.Fatalf("accepted a token nobody signed: %q (subject %q)", token, id.Subject)
		}
		if id != nil {
			t.Fatal("an identity returned with an error")
		}
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("error %T %v is not an *auth.Error", err, err)
		}
		if e.Kind != Invalid && e.Kind != NotAllowed {
			t.Errorf("kind %d with the keys loaded", e.Kind)
		}
		if e.Reason == "" || e.Msg == "" {
			t.Errorf("empty reason %q or message %q", e.Reason, e.Msg)
		}
		if !utf8.ValidString(e.Msg) || len(e.Msg) > 400 {
			t.Errorf("message not short valid UTF-8 (%d bytes): %q", len(e.Msg), e.Msg)
		}
		if parts := strings.Split(token, "."); len(parts) == 3 && len(parts[2]) >= 16 && strings.Contains(e.Msg, parts[2]) {
			t.Errorf("message contains the signature: %q", e.Msg)
		}
	})
}

func prefixOf(token string) string {
	return token[:strings.LastIndex(token, ".")+1]
}
