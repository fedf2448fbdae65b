// Package sqlquote quotes names and values into SQL text, for the SQL the
// proxy prints for a DBA (`rlsproxy sql`, the fixes `rlsproxy check`
// suggests) and for test fixtures. The proxy itself never builds SQL from
// values: it sends them as bind parameters.
package sqlquote

import (
	"strings"

	"github.com/jackc/pgx/v5"
)

// Literal quotes s as a string literal that reads the same whatever
// standard_conforming_strings is: with a backslash in s, as E'...' with
// the backslashes doubled (as PostgreSQL's quote_literal does).
func Literal(s string) string {
	s = strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(s, `\`, `\\`) + "'"
	}
	return "'" + s + "'"
}

// Ident quotes a name, or a qualified name given in parts, as an
// identifier.
func Ident(parts ...string) string { return pgx.Identifier(parts).Sanitize() }
