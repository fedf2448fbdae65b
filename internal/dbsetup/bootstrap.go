package dbsetup

import (
	_ "embed"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"text/template"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
	"github.com/rlsproxy/rlsproxy/session"
)

//go:embed bootstrap.sql
var bootstrapSQL string

var bootstrapTemplate = template.Must(template.New("bootstrap").Funcs(template.FuncMap{
	"ident": func(s string) string { return sqlquote.Ident(s) },
	"idents": func(names []string) string {
		q := make([]string, len(names))
		for i, n := range names {
			q[i] = sqlquote.Ident(n)
		}
		return strings.Join(q, ", ")
	},
	"literal": sqlquote.Literal,
}).Parse(bootstrapSQL))

// BootstrapOptions describe the database side of a proxy configuration.
type BootstrapOptions struct {
	Policy   session.Policy
	Login    string // the --upstream user
	Database string // for the hardening statements
	Signer   *session.Signer
	Leeway   time.Duration
	Harden   bool
	// Transition keeps the --upstream login a member of the mapped roles,
	// as before per-role logins, so that proxies not yet restarted with the
	// signing key keep working: run the SQL again without it once they are.
	Transition bool
}

// roleLogin is a mapped role's own login (session.LoginFor).
type roleLogin struct {
	Role, Name, Verifier string
}

// BootstrapSQL renders the SQL a DBA runs once: roles, the auth schema, the
// signing key and, optionally, hardening. Names are quoted as identifiers
// and literals; the text holds no value from a token.
func BootstrapSQL(o BootstrapOptions) (string, error) {
	if o.Login == "" {
		o.Login = "authenticator"
	}
	if o.Database == "" {
		o.Database = "postgres"
	}
	roles := o.Policy.Roles()
	if len(roles) == 0 {
		return "", fmt.Errorf("no roles: set --role or --role-map")
	}
	if slices.Contains(roles, o.Login) {
		return "", fmt.Errorf("the login role %q is also a mapped role: the proxy would hand clients the service login", o.Login)
	}
	quoted := make([]string, len(roles))
	for i, r := range roles {
		quoted[i] = sqlquote.Ident(r)
	}
	claims := o.Policy.ClaimsSetting
	if claims == "" {
		return "", fmt.Errorf("the auth.* functions read --claims-setting, which is empty")
	}
	data := map[string]any{
		"Roles": roles, "RoleList": strings.Join(quoted, ", "), "Login": o.Login, "Database": o.Database,
		"ClaimsSetting": claims, "SignatureSetting": session.SignatureSetting, "Signed": o.Signer != nil,
		"LeewaySeconds": int(o.Leeway.Seconds()), "Harden": o.Harden,
	}
	if o.Signer != nil {
		ipad, opad := o.Signer.Pads()
		data["IPad"], data["OPad"] = hex.EncodeToString(ipad), hex.EncodeToString(opad)
		var logins []roleLogin
		var names []string
		for _, r := range roles {
			name := session.LoginFor(o.Login, r)
			v, err := o.Signer.LoginVerifier(name)
			if err != nil {
				return "", err
			}
			logins = append(logins, roleLogin{Role: r, Name: name, Verifier: v})
			names = append(names, name)
		}
		data["Logins"], data["LoginNames"], data["Transition"] = logins, names, o.Transition
	}
	var b strings.Builder
	if err := bootstrapTemplate.Execute(&b, data); err != nil {
		return "", err
	}
	return b.String(), nil
}
