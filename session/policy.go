// Package session turns an authenticated identity into an upstream
// PostgreSQL session: the role and claim settings it runs with (policy.go),
// their signature (signing.go), the service login (dialer.go), the
// connection and what it knows of itself (upstream.go), the proxy's own
// round trips on it and their proof (proof.go), and the pool that keeps
// connections between client sessions (pool.go).
package session

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"

	"github.com/rlsproxy/rlsproxy/auth"
)

// Policy maps an identity to the role and settings of its upstream session.
type Policy struct {
	DefaultRole   string     // --role: for a token with no mapped group
	RoleClaim     string     // --role-claim: the claim holding the groups
	RoleMap       []RoleRule // --role-map, in the order given
	AnonymousRole string     // --anonymous-role: "" disables anonymous sessions
	ClaimsSetting string     // --claims-setting: receives all claims as JSON
	ClaimPrefix   string     // --claim-prefix: one setting per top-level claim
}

// RoleRule maps a group to a role.
type RoleRule struct{ Group, Role string }

// ParseRoleMap parses "group=role,group2=role2".
func ParseRoleMap(s string) ([]RoleRule, error) {
	var rules []RoleRule
	for _, pair := range strings.Split(s, ",") {
		pair = strings.TrimSpace(pair)
		if pair == "" {
			continue
		}
		g, r, ok := strings.Cut(pair, "=")
		g, r = strings.TrimSpace(g), strings.TrimSpace(r)
		if !ok || g == "" || r == "" {
			return nil, fmt.Errorf("--role-map entry %q is not group=role", pair)
		}
		rules = append(rules, RoleRule{Group: g, Role: r})
	}
	return rules, nil
}

// Validate checks the policy's setting names.
func (p Policy) Validate() error {
	if p.ClaimsSetting != "" && !ValidSettingName(p.ClaimsSetting) {
		return fmt.Errorf("--claims-setting %q is not a valid custom setting name (it needs a dot, like request.jwt.claims)", p.ClaimsSetting)
	}
	if p.ClaimPrefix != "" && (!strings.HasSuffix(p.ClaimPrefix, ".") || !ValidSettingName(p.ClaimPrefix+"x")) {
		return fmt.Errorf("--claim-prefix %q must be a setting name prefix ending in a dot (like jwt.claims.)", p.ClaimPrefix)
	}
	return nil
}

// ErrNoRole is a valid token the policy maps to no role.
var ErrNoRole = errors.New("token maps to no database role: none of its groups is in --role-map and --role is empty")

// Grant is what one session runs as.
type Grant struct {
	Role     string
	Settings []Setting
	// Claims is the claim set as JSON, the text the signature covers; empty
	// for anonymous sessions, which carry no claims and no signature.
	Claims string
}

// SameIdentity reports whether g and o install the same role, settings and
// claims: a connection with g installed serves o's session as it is, with
// whatever state g's sessions left there. Two sessions of one token are one
// bearer; two anonymous sessions are anybody, so an anonymous grant (no
// claims; each anonymous session has its own) is only the same as itself.
func (g *Grant) SameIdentity(o *Grant) bool {
	if g == nil || o == nil {
		return false
	}
	if g == o {
		return true
	}
	return g.Claims != "" && g.Role == o.Role && g.Claims == o.Claims && slices.Equal(g.Settings, o.Settings)
}

// Setting is one session setting installed upstream.
type Setting struct{ Name, Value string }

// Grant decides the role and settings for a verified identity.
func (p Policy) Grant(id *auth.Identity, log *slog.Logger) (*Grant, error) {
	role := p.roleFor(id.Claims[p.RoleClaim])
	if role == "" {
		return nil, ErrNoRole
	}
	g := &Grant{Role: role, Claims: id.ClaimsJSON}
	if p.ClaimsSetting != "" {
		g.Settings = append(g.Settings, Setting{p.ClaimsSetting, id.ClaimsJSON})
	}
	if p.ClaimPrefix == "" {
		return g, nil
	}
	names := make([]string, 0, len(id.Claims))
	for k := range id.Claims {
		names = append(names, k)
	}
	// Setting names fold case, so "Sub" and "sub" would land on one setting:
	// the all-lower-case claim wins, so a stray "Sub" never shadows "sub".
	sort.Slice(names, func(i, j int) bool {
		fi, fj := strings.ToLower(names[i]), strings.ToLower(names[j])
		if fi != fj {
			return fi < fj
		}
		return names[i] == fi
	})
	seen := make(map[string]bool, len(names))
	for _, k := range names {
		name := p.ClaimPrefix + k
		folded := strings.ToLower(name)
		value, err := settingValue(id.Claims[k])
		switch {
		case !ValidSettingName(name):
			log.Info("claim skipped: its name cannot be a setting name", "claim", k)
			continue
		case seen[folded]:
			log.Info("claim skipped: another claim has the same name but for case", "claim", k)
			continue
		case err != nil:
			log.Info("claim skipped", "claim", k, "reason", err.Error())
			continue
		}
		seen[folded] = true
		g.Settings = append(g.Settings, Setting{name, value})
	}
	return g, nil
}

// AnonymousGrant is the grant of a client that connects as user "anonymous"
// without a token. ok is false when anonymous sessions are off.
func (p Policy) AnonymousGrant() (g *Grant, ok bool) {
	if p.AnonymousRole == "" {
		return nil, false
	}
	return &Grant{Role: p.AnonymousRole}, true
}

// roleFor returns the role of the first group in the token's order that the
// role map names, else the default role.
func (p Policy) roleFor(groups any) string {
	var list []string
	switch v := groups.(type) {
	case string:
		list = []string{v}
	case []any:
		for _, e := range v {
			if s, ok := e.(string); ok {
				list = append(list, s)
			}
		}
	}
	for _, grp := range list {
		for _, r := range p.RoleMap {
			if r.Group == grp {
				return r.Role
			}
		}
	}
	return p.DefaultRole
}

// Protected reports whether a setting carries identity, so that no client may
// set it: the role, the session authorization, and the claim settings.
func (p Policy) Protected(name string) bool {
	n := strings.ToLower(name)
	switch n {
	case "role", "session_authorization", "is_superuser":
		return true
	}
	if strings.HasPrefix(n, "rlsproxy.") { // the claims signature
		return true
	}
	if p.ClaimsSetting != "" && n == strings.ToLower(p.ClaimsSetting) {
		return true
	}
	return p.ClaimPrefix != "" && strings.HasPrefix(n, strings.ToLower(p.ClaimPrefix))
}

// settingValue renders a claim as a setting value: strings as they are, all
// else as JSON text (so true becomes "true" and an array its JSON).
func settingValue(v any) (string, error) {
	s, ok := v.(string)
	if !ok {
		js, err := json.Marshal(v)
		if err != nil {
			return "", err
		}
		s = string(js)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return "", fmt.Errorf("value holds a NUL byte, which a setting cannot")
	}
	return s, nil
}

// ValidSettingName reports whether PostgreSQL accepts name as a custom
// (placeholder) setting: dot-separated identifiers, each starting with a
// letter, underscore or non-ASCII byte (valid_custom_variable_name in guc.c).
func ValidSettingName(name string) bool {
	sawDot, start := false, true
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '.':
			if start {
				return false
			}
			sawDot, start = true, true
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_', c >= 0x80:
			start = false
		case !start && (c >= '0' && c <= '9' || c == '$'):
		default:
			return false
		}
	}
	return sawDot && !start
}

// Roles lists the roles sessions can run as, in a stable order.
func (p Policy) Roles() []string {
	var roles []string
	add := func(r string) {
		if r != "" && !slices.Contains(roles, r) {
			roles = append(roles, r)
		}
	}
	add(p.DefaultRole)
	for _, r := range p.RoleMap {
		add(r.Role)
	}
	add(p.AnonymousRole)
	return roles
}
