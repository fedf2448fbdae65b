package dbsetup

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"github.com/rlsproxy/rlsproxy/session"

	_ "embed"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"text/template"
	"time"
)

//go:embed bootstrap.sql
var bootstrapSQL string

var bootstrapTemplate = template.Must(template.New("bootstrap").Funcs(template.FuncMap{
	"ident":   func(s string) string { return sqlquote.Ident(s) },
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
	}
	var b strings.Builder
	if err := bootstrapTemplate.Execute(&b, data); err != nil {
		return "", err
	}
	return b.String(), nil
}
