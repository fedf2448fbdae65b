package session

import (
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	"github.com/rlsproxy/rlsproxy/auth"
)

func identity(t *testing.T, claimsJSON string) *auth.Identity {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(claimsJSON))
	dec.UseNumber()
	var claims map[string]any
	if err := dec.Decode(&claims); err != nil {
		t.Fatal(err)
	}
	js, _ := json.Marshal(claims)
	sub, _ := claims["sub"].(string)
	return &auth.Identity{Subject: sub, Claims: claims, ClaimsJSON: string(js)}
}

func TestRoleFor(t *testing.T) {
	p := Policy{DefaultRole: "authenticated", RoleClaim: "cognito:groups",
		RoleMap: []RoleRule{{"admins", "admin"}, {"editors", "editor"}}}
	for _, tc := range []struct {
		name, claims, want string
	}{
		{"no groups", `{"sub":"u"}`, "authenticated"},
		{"unmapped groups", `{"sub":"u","cognito:groups":["x","y"]}`, "authenticated"},
		{"first mapped in token order", `{"sub":"u","cognito:groups":["x","editors","admins"]}`, "editor"},
		{"other order", `{"sub":"u","cognito:groups":["admins","editors"]}`, "admin"},
		{"string claim", `{"sub":"u","cognito:groups":"admins"}`, "admin"},
		{"non-string entries ignored", `{"sub":"u","cognito:groups":[1,{"a":"admins"},"editors"]}`, "editor"},
		{"wrong type falls back", `{"sub":"u","cognito:groups":{"admins":true}}`, "authenticated"},
		{"case matters", `{"sub":"u","cognito:groups":["Admins"]}`, "authenticated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := p.Grant(identity(t, tc.claims), slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			if g.Role != tc.want {
				t.Fatalf("role %s, want %s", g.Role, tc.want)
			}
		})
	}
	p.DefaultRole = ""
	if _, err := p.Grant(identity(t, `{"sub":"u"}`), slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("no role and no --role: want a refusal")
	}
}

func TestGrantSettings(t *testing.T) {
	p := Policy{DefaultRole: "authenticated", ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
	id := identity(t, `{"sub":"u1","email_verified":true,"n":1.50,"big":12345678901234567890,
		"cognito:groups":["a"],"arr":["x",1],"obj":{"k":null},"nul":null,"Sub":"shadow","bad name":"x","nulbyte":"a\u0000b"}`)
	g, err := p.Grant(id, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, s := range g.Settings {
		got[s.Name] = s.Value
	}
	want := map[string]string{
		"request.jwt.claims":        id.ClaimsJSON,
		"jwt.claims.sub":            "u1",
		"jwt.claims.email_verified": "true",
		"jwt.claims.n":              "1.50",
		"jwt.claims.big":            "12345678901234567890",
		"jwt.claims.arr":            `["x",1]`,
		"jwt.claims.obj":            `{"k":null}`,
		"jwt.claims.nul":            "null",
		// "Sub" folds onto "sub", which wins: it is skipped.
	}
	if len(got) != len(want) {
		t.Fatalf("settings %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
}

func TestValidSettingName(t *testing.T) {
	for name, want := range map[string]bool{
		"jwt.claims.sub":              true,
		"request.jwt.claims":          true,
		"a.b":                         true,
		"a.b$1":                       true,
		"jwt.claims.cognito:groups":   false,
		"jwt.claims.custom:tenant":    false,
		"nodot":                       false,
		".a":                          false,
		"a.":                          false,
		"a..b":                        false,
		"a.1b":                        false,
		"a.b c":                       false,
		"jwt.claims.é":                true,
		"jwt.claims.with-dash":        false,
		"jwt.claims.with_underscore1": true,
	} {
		if got := ValidSettingName(name); got != want {
			t.Errorf("ValidSettingName(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestProtected(t *testing.T) {
	p := Policy{ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
	for name, want := range map[string]bool{
		"role": true, "ROLE": true, "session_authorization": true, "Session_Authorization": true,
		"request.jwt.claims": true, "Request.JWT.Claims": true, "jwt.claims.sub": true, "JWT.CLAIMS.anything": true,
		"application_name": false, "search_path": false, "jwt.claimsx": false, "request.jwt.claims2": false,
	} {
		if got := p.Protected(name); got != want {
			t.Errorf("Protected(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestParseRoleMap(t *testing.T) {
	rules, err := ParseRoleMap(" admins=admin, editors = editor ,")
	if err != nil || len(rules) != 2 || rules[1] != (RoleRule{"editors", "editor"}) {
		t.Fatalf("%v %v", rules, err)
	}
	for _, bad := range []string{"admins", "=admin", "admins="} {
		if _, err := ParseRoleMap(bad); err == nil {
			t.Errorf("ParseRoleMap(%q) accepted", bad)
		}
	}
}

func TestPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		p  Policy
		ok bool
	}{
		{Policy{ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}, true},
		{Policy{}, true},
		{Policy{ClaimsSetting: "claims"}, false},
		{Policy{ClaimPrefix: "jwt.claims"}, false},
		{Policy{ClaimPrefix: "jwt..claims."}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v", tc.p, err)
		}
	}
}
