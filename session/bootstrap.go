package session

import (
	_ "embed"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5"
)

//go:embed bootstrap.sql
var bootstrapSQL string

var bootstrapTemplate = template.Must(template.New("bootstrap").Funcs(template.FuncMap{
	"ident":   func(s string) string { return pgx.Identifier{s}.Sanitize() },
	"literal": quoteLiteral,
}).Parse(bootstrapSQL))

// BootstrapOptions describe the database side of a proxy configuration.
type BootstrapOptions struct {
	Policy   Policy
	Login    string // the --upstream user
	Database string // for the hardening statements
	Signer   *Signer
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
		quoted[i] = pgx.Identifier{r}.Sanitize()
	}
	claims := o.Policy.ClaimsSetting
	if claims == "" {
		return "", fmt.Errorf("the auth.* functions read --claims-setting, which is empty")
	}
	data := map[string]any{
		"Roles": roles, "RoleList": strings.Join(quoted, ", "), "Login": o.Login, "Database": o.Database,
		"ClaimsSetting": claims, "SignatureSetting": SignatureSetting, "Signed": o.Signer != nil,
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

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings on).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
