package auth

import (
	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// TestClientAndUseRules runs the token_use, client and audience rules through
// Verify against a real JWKS: Cognito rules (access tokens name their app
// client in client_id, id tokens in aud) and the rules of other issuers
// (client_id, azp or aud for --client-id; aud for --audience).
func TestClientAndUseRules(t *testing.T) {
	ti := newTestIssuer(t)
	now := time.Now()

	cognito := func(use string, clients ...string) Rules {
		return Rules{Issuer: ti.URL, Cognito: true, TokenUse: use, ClientIDs: clients}
	}
	generic := func(clients, audiences []string) Rules {
		return Rules{Issuer: ti.URL, TokenUse: "access", ClientIDs: clients, Audiences: audiences}
	}
	// claims of a token at now, with extra claims (nil deletes).
	claims := func(extra map[string]any) jwt.MapClaims {
		return withClaims(map[string]any{"iss": ti.URL, "sub": "user-1", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}, extra)
	}
	access := map[string]any{"token_use": "access", "client_id": devissuer.ClientID}
	id := map[string]any{"token_use": "id", "aud": devissuer.ClientID}

	tests := []struct {
		name   string
		rules  Rules
		claims map[string]any
		kind   Kind
		reason string // empty: accepted
		msg    string
	}{
		// Cognito: token_use.
		{name: "cognito access token, access wanted", rules: cognito("access", devissuer.ClientID), claims: access},
		{name: "cognito id token, id wanted", rules: cognito("id", devissuer.ClientID), claims: id},
		{name: "cognito access token, any", rules: cognito("any", devissuer.ClientID), claims: access},
		{name: "cognito id token, any", rules: cognito("any", devissuer.ClientID), claims: id},
		{
			name: "cognito id token, access wanted", rules: cognito("access", devissuer.ClientID), claims: id,
			kind: NotAllowed, reason: "token_use", msg: "token_use id is not accepted: send the access token",
		},
		{
			name: "cognito access token, id wanted", rules: cognito("id", devissuer.ClientID), claims: access,
			kind: NotAllowed, reason: "token_use", msg: "token_use access is not accepted: send the id token",
		},
		{
			name: "cognito token without token_use", rules: cognito("any", devissuer.ClientID), claims: map[string]any{"client_id": devissuer.ClientID},
			kind: Invalid, reason: "malformed", msg: "token has no token_use of access or id: not a Cognito user pool token",
		},
		{
			name: "cognito refresh-like token_use", rules: cognito("any", devissuer.ClientID), claims: map[string]any{"token_use": "refresh", "client_id": devissuer.ClientID},
			kind: Invalid, reason: "malformed", msg: "token has no token_use of access or id",
		},

		// Cognito: app client.
		{name: "cognito access token, one of several clients", rules: cognito("access", "web", devissuer.ClientID), claims: access},
		{
			name: "cognito access token of another app client", rules: cognito("access", "web"), claims: access,
			kind: NotAllowed, reason: "client", msg: "token was issued to an app client that is not in --client-id",
		},
		{
			name: "cognito access token without client_id", rules: cognito("access", devissuer.ClientID), claims: map[string]any{"token_use": "access"},
			kind: NotAllowed, reason: "client", msg: "not in --client-id",
		},
		{
			// An access token's aud is not its client: only client_id counts.
			name: "cognito access token naming the client in aud only", rules: cognito("access", devissuer.ClientID),
			claims: map[string]any{"token_use": "access", "client_id": "web", "aud": devissuer.ClientID},
			kind:   NotAllowed, reason: "client", msg: "not in --client-id",
		},
		{
			name: "cognito id token of another app client", rules: cognito("id", "web"), claims: id,
			kind: NotAllowed, reason: "client", msg: "token audience is not an app client in --client-id",
		},
		{
			// And an id token's client_id is not its client: only aud counts.
			name: "cognito id token naming the client in client_id only", rules: cognito("id", devissuer.ClientID),
			claims: map[string]any{"token_use": "id", "aud": "web", "client_id": devissuer.ClientID},
			kind:   NotAllowed, reason: "client", msg: "token audience is not an app client in --client-id",
		},
		{name: "cognito id token, aud array", rules: cognito("id", devissuer.ClientID), claims: map[string]any{"token_use": "id", "aud": []string{"web", devissuer.ClientID}}},

		// Other issuers: --client-id matches client_id, azp or aud.
		{name: "generic, client_id matches", rules: generic([]string{"app"}, nil), claims: map[string]any{"client_id": "app"}},
		{name: "generic, azp matches", rules: generic([]string{"app"}, nil), claims: map[string]any{"azp": "app", "aud": "api"}},
		{name: "generic, aud matches", rules: generic([]string{"app"}, nil), claims: map[string]any{"aud": "app"}},
		{name: "generic, aud array matches", rules: generic([]string{"app"}, nil), claims: map[string]any{"aud": []string{"x", "app"}}},
		{
			name: "generic, no client matches", rules: generic([]string{"app"}, nil), claims: map[string]any{"azp": "other", "aud": "api", "client_id": "other"},
			kind: NotAllowed, reason: "client", msg: "token was issued to a client that is not in --client-id",
		},
		{
			name: "generic, no client claim at all", rules: generic([]string{"app"}, nil), claims: nil,
			kind: NotAllowed, reason: "client", msg: "not in --client-id",
		},
		{
			// A non-string client_id must not match by its JSON text.
			name: "generic, client_id not a string", rules: generic([]string{"1"}, nil), claims: map[string]any{"client_id": 1},
			kind: NotAllowed, reason: "client", msg: "not in --client-id",
		},

		// Other issuers: --audience.
		{name: "generic, audience matches", rules: generic(nil, []string{"api"}), claims: map[string]any{"aud": "api"}},
		{name: "generic, audience in array", rules: generic(nil, []string{"api"}), claims: map[string]any{"aud": []string{"web", "api"}}},
		{
			name: "generic, audience mismatch", rules: generic(nil, []string{"api"}), claims: map[string]any{"aud": "web"},
			kind: NotAllowed, reason: "audience", msg: "token audience is not in --audience",
		},
		{
			name: "generic, no aud", rules: generic(nil, []string{"api"}), claims: nil,
			kind: NotAllowed, reason: "audience", msg: "token audience is not in --audience",
		},
		{
			// azp is a client, not an audience.
			name: "generic, audience only in azp", rules: generic(nil, []string{"api"}), claims: map[string]any{"azp": "api"},
			kind: NotAllowed, reason: "audience", msg: "not in --audience",
		},
		{name: "generic, client and audience both match", rules: generic([]string{"app"}, []string{"api"}), claims: map[string]any{"azp": "app", "aud": "api"}},
		{
			name: "generic, client matches, audience does not", rules: generic([]string{"app"}, []string{"api"}), claims: map[string]any{"azp": "app", "aud": "web"},
			kind: NotAllowed, reason: "audience", msg: "not in --audience",
		},

		// Other issuers: token_use is optional, but honoured when present.
		{name: "generic, no token_use, no restriction", rules: generic(nil, nil), claims: nil},
		{
			name: "generic, id token_use, access wanted", rules: generic(nil, nil), claims: map[string]any{"token_use": "id"},
			kind: NotAllowed, reason: "token_use", msg: "token_use id is not accepted: send the access token",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := ti.start(t, Config{Rules: tc.rules})
			tok := ti.sign(t, claims(tc.claims))
			got, err := v.Verify(context.Background(), tok)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				if got.Subject != "user-1" {
					t.Errorf("subject %q", got.Subject)
				}
				return
			}
			expectRejection(t, got, err, tok, tc.kind, tc.reason, tc.msg)
		})
	}
}

// TestRulesCheck covers what a signed token cannot easily carry through jwt's
// encoder: claim types as decoded without json.Number, fractional dates,
// issuer spelling.
func TestRulesCheck(t *testing.T) {
	now := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	rules := Rules{Issuer: "https://issuer.example.com", TokenUse: "access"}
	base := func(extra map[string]any) map[string]any {
		return withClaims(map[string]any{"iss": "https://issuer.example.com", "sub": "u", "exp": json.Number("1777597200")}, extra) // now + 1h
	}
	tests := []struct {
		name   string
		claims map[string]any
		reason string // empty: accepted
		msg    string
	}{
		{name: "json.Number dates", claims: base(nil)},
		{name: "float64 dates", claims: base(map[string]any{"exp": float64(now.Add(time.Hour).Unix()), "iat": float64(now.Unix())})},
		{name: "fractional exp just ahead", claims: base(map[string]any{"exp": json.Number("1777593600.5")})},
		{name: "fractional exp just past", claims: base(map[string]any{"exp": json.Number("1777593599.5")}), reason: "expired", msg: "token expired at 2026-04-30T23:59:59Z"},
		{name: "exponent form", claims: base(map[string]any{"exp": json.Number("1.7775972e9")})},
		{name: "issuer with trailing slash", claims: base(map[string]any{"iss": "https://issuer.example.com/"})},
		{name: "issuer differing in case", claims: base(map[string]any{"iss": "https://ISSUER.example.com"}), reason: "issuer", msg: "token was not issued by https://issuer.example.com"},
		{name: "issuer as a prefix", claims: base(map[string]any{"iss": "https://issuer.example.com.evil"}), reason: "issuer", msg: "not issued by"},
		{name: "issuer not a string", claims: base(map[string]any{"iss": []any{"https://issuer.example.com"}}), reason: "issuer", msg: "not issued by"},
		{name: "exp a string", claims: base(map[string]any{"exp": "1777597200"}), reason: "malformed", msg: "token claim exp is not a number"},
		{name: "exp a bool", claims: base(map[string]any{"exp": true}), reason: "malformed", msg: "token claim exp is not a number"},
		{name: "exp not numeric text", claims: base(map[string]any{"exp": json.Number("soon")}), reason: "malformed", msg: "token claim exp is not a number"},
		{name: "exp negative", claims: base(map[string]any{"exp": json.Number("-1")}), reason: "malformed", msg: "token claim exp is out of range"},
		{name: "exp in year 5000", claims: base(map[string]any{"exp": json.Number("95617584000")}), reason: "", msg: ""},
		{name: "exp too far", claims: base(map[string]any{"exp": json.Number("100000000001")}), reason: "malformed", msg: "token claim exp is out of range"},
		{name: "exp huge", claims: base(map[string]any{"exp": json.Number("1e400")}), reason: "malformed", msg: "token claim exp is"},
		{name: "nbf a string", claims: base(map[string]any{"nbf": "now"}), reason: "malformed", msg: "token claim nbf is not a number"},
		{name: "iat out of range", claims: base(map[string]any{"iat": json.Number("-5")}), reason: "malformed", msg: "token claim iat is out of range"},
		{name: "sub not a string", claims: base(map[string]any{"sub": json.Number("42")}), reason: "malformed", msg: "token has no sub claim"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := rules.Check(tc.claims, now)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				if id.Subject != "u" || len(id.ClaimsJSON) == 0 {
					t.Errorf("identity %+v", id)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v, want *Error %s", err, tc.reason)
			}
			if e.Kind != Invalid || e.Reason != tc.reason || !strings.Contains(e.Msg, tc.msg) {
				t.Errorf("got kind %d %s %q, want Invalid %s %q", e.Kind, e.Reason, e.Msg, tc.reason, tc.msg)
			}
		})
	}
}

// TestRulesCheckExpiresAt: the session timer runs from Identity.ExpiresAt, so
// it must be the token's exp, fraction included, and not exp plus leeway.
func TestRulesCheckExpiresAt(t *testing.T) {
	now := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	rules := Rules{Issuer: "https://i.example", Leeway: 30 * time.Second}
	id, err := rules.Check(map[string]any{"iss": "https://i.example", "sub": "u", "exp": json.Number("1777593610.25")}, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Add(10*time.Second + 250*time.Millisecond); !id.ExpiresAt.Equal(want) {
		t.Errorf("ExpiresAt %v, want %v", id.ExpiresAt, want)
	}
}

// withClaims sets extra's claims on c and returns it; a nil value deletes
// the claim.
func withClaims(c, extra map[string]any) map[string]any {
	for k, v := range extra {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}
