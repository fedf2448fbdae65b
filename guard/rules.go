package guard

import (
	"bytes"
	"fmt"
	"slices"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// This file holds every rule of the SQL guard: what a client may not send
// because it could change the session's identity or run code out of sight,
// and the words without which no statement can break a rule. How a text is
// read (readings.go), parsed (parse.go, isolate.go) and cached (guard.go) is
// elsewhere.

// largeObjectFunctions are the functions libpq's large-object interface calls
// by OID with the FunctionCall message (pg_proc OIDs, stable across versions).
var largeObjectFunctions = map[uint32]string{
	952: "lo_open", 953: "lo_close", 954: "loread", 955: "lowrite", 956: "lo_lseek",
	957: "lo_creat", 958: "lo_tell", 964: "lo_unlink", 715: "lo_create", 1004: "lo_truncate",
	3170: "lo_lseek64", 3171: "lo_tell64", 3172: "lo_truncate64",
}

// node is the rule for one parse-tree node.
func (g *Guard) node(n any) *Rejection {
	switch n := n.(type) {
	case *pg_query.VariableSetStmt:
		return g.setting(n)
	case *pg_query.FuncCall:
		if len(n.Funcname) > 0 {
			name := n.Funcname[len(n.Funcname)-1].GetString_().GetSval()
			if strings.EqualFold(name, "set_config") {
				return g.setConfig(n)
			}
			return function(name, false)
		}
	case *pg_query.A_Indirection:
		// (expr).f is PostgreSQL's attribute notation for f(expr).
		for _, ind := range n.Indirection {
			if s := ind.GetString_(); s != nil {
				if rej := function(s.Sval, true); rej != nil {
					return rej
				}
			}
		}
	case *pg_query.ColumnRef:
		// So is x.f, when x is a table or column and no column f exists.
		if len(n.Fields) >= 2 {
			if s := n.Fields[len(n.Fields)-1].GetString_(); s != nil {
				return function(s.Sval, true)
			}
		}
	case *pg_query.DoStmt:
		return rejection("do", "DO blocks are not allowed through rlsproxy: they run code the guard cannot see"+allowCodeHint)
	case *pg_query.CreateFunctionStmt:
		return rejection("create_function", "creating functions or procedures is not allowed through rlsproxy: they run code the guard cannot see"+allowCodeHint)
	case *pg_query.AlterFunctionStmt:
		return rejection("alter_function", "altering functions or procedures is not allowed through rlsproxy"+allowCodeHint)
	case *pg_query.CreateTrigStmt, *pg_query.CreateEventTrigStmt, *pg_query.AlterEventTrigStmt:
		return rejection("trigger", "creating or altering triggers is not allowed through rlsproxy: they run code the guard cannot see"+allowCodeHint)
	case *pg_query.RuleStmt:
		return rejection("rule", "creating rules is not allowed through rlsproxy: they run statements the guard cannot see"+allowCodeHint)
	case *pg_query.CreateRoleStmt, *pg_query.AlterRoleStmt, *pg_query.AlterRoleSetStmt, *pg_query.DropRoleStmt,
		*pg_query.GrantRoleStmt, *pg_query.ReassignOwnedStmt, *pg_query.AlterOwnerStmt:
		return rejection("alter_role", "changing roles, role memberships or ownership is not allowed through rlsproxy")
	case *pg_query.RenameStmt:
		if n.RenameType == pg_query.ObjectType_OBJECT_ROLE {
			return rejection("alter_role", "changing roles, role memberships or ownership is not allowed through rlsproxy")
		}
		if n.RenameType == pg_query.ObjectType_OBJECT_SCHEMA {
			return g.userSchema(n.Newname)
		}
	case *pg_query.CreateSchemaStmt:
		if n.Authrole != nil {
			return rejection("alter_role", "creating objects owned by another role (CREATE SCHEMA ... AUTHORIZATION) is not allowed through rlsproxy")
		}
		return g.userSchema(n.Schemaname)
	case *pg_query.UpdateStmt:
		if isSettingsView(n.Relation) {
			return rejection("settings_view", "updating pg_settings is not allowed through rlsproxy: it changes settings as set_config does")
		}
	case *pg_query.MergeStmt:
		if isSettingsView(n.Relation) {
			return rejection("settings_view", "updating pg_settings is not allowed through rlsproxy: it changes settings as set_config does")
		}
	case *pg_query.ViewStmt:
		// A view over pg_settings is updatable through pg_settings' own
		// rules: an UPDATE of the view is a set_config in disguise.
		var over bool
		walk(n.ProtoReflect(), func(m protoreflect.Message) bool {
			rv, ok := m.Interface().(*pg_query.RangeVar)
			over = ok && isSettingsView(rv)
			return !over
		})
		if over {
			return rejection("settings_view", "creating a view over pg_settings is not allowed through rlsproxy: updating it would change settings")
		}
	case *pg_query.DropStmt:
		if n.RemoveType == pg_query.ObjectType_OBJECT_POLICY {
			return rejection("row_security", "dropping row-level security policies is not allowed through rlsproxy")
		}
	case *pg_query.AlterDatabaseSetStmt, *pg_query.AlterSystemStmt:
		return rejection("alter_settings", "changing stored settings (ALTER DATABASE/SYSTEM ... SET) is not allowed through rlsproxy")
	case *pg_query.CreateExtensionStmt:
		// What ORMs send at start (TypeORM's "uuid-ossp"): the server skips
		// an extension already installed, with a notice, and creating one
		// needs a privilege the client roles need not have (CREATE on the
		// database; untrusted ones, superuser). Anything more (a schema of
		// the client's choosing, a version, CASCADE) stays refused.
		if n.IfNotExists && len(n.Options) == 0 {
			return nil
		}
		return rejection("hidden_code", "creating extensions is not allowed through rlsproxy: they run code the guard cannot see (CREATE EXTENSION IF NOT EXISTS name, without options, passes: the server skips an installed one)")
	case *pg_query.DefineStmt, *pg_query.CreateCastStmt, *pg_query.CreateTransformStmt, *pg_query.CreateConversionStmt,
		*pg_query.CreateOpClassStmt, *pg_query.CreateOpFamilyStmt, *pg_query.CreatePLangStmt,
		*pg_query.AlterExtensionStmt, *pg_query.AlterExtensionContentsStmt, *pg_query.LoadStmt:
		return rejection("hidden_code", "defining operators, aggregates, casts, languages or extensions is not allowed through rlsproxy: they run code the guard cannot see")
	case *pg_query.CreateForeignServerStmt, *pg_query.CreateUserMappingStmt, *pg_query.AlterUserMappingStmt,
		*pg_query.CreateSubscriptionStmt, *pg_query.AlterSubscriptionStmt:
		return rejection("foreign_connection", "creating connections to other servers is not allowed through rlsproxy")
	case *pg_query.CreatePolicyStmt, *pg_query.AlterPolicyStmt:
		return rejection("row_security", "creating or altering row-level security policies is not allowed through rlsproxy")
	case *pg_query.AlterTableCmd:
		switch n.Subtype {
		case pg_query.AlterTableType_AT_DisableRowSecurity, pg_query.AlterTableType_AT_NoForceRowSecurity:
			return rejection("row_security", "turning row-level security off is not allowed through rlsproxy")
		case pg_query.AlterTableType_AT_ChangeOwner:
			return rejection("alter_role", "changing roles, role memberships or ownership is not allowed through rlsproxy")
		}
	}
	return nil
}

// setting is the rule for SET, SET LOCAL, SET SESSION and RESET.
func (g *Guard) setting(vs *pg_query.VariableSetStmt) *Rejection {
	if vs.Kind == pg_query.VariableSetKind_VAR_SET_MULTI || vs.Kind == pg_query.VariableSetKind_VAR_RESET_ALL {
		return nil // SET TRANSACTION ...; RESET ALL (a reset)
	}
	if strings.EqualFold(vs.Name, "client_encoding") && vs.Kind == pg_query.VariableSetKind_VAR_SET_VALUE {
		return lexableEncodingArgs(vs.Args)
	}
	if !g.policy.Protected(vs.Name) || isReset(vs) {
		return nil
	}
	switch strings.ToLower(vs.Name) {
	case "role":
		return rejection("role", "changing the role is not allowed through rlsproxy")
	case "session_authorization":
		return rejection("session_authorization", "changing the session authorization is not allowed through rlsproxy")
	}
	return rejection("claims_setting", fmt.Sprintf("setting %s is not allowed through rlsproxy: it carries the identity of the session", vs.Name))
}

// setConfig is the rule for set_config(setting_name, new_value, is_local),
// which pg_dump and migration tools call for their own settings
// (search_path, lock_timeout): it passes when the setting's name is a
// constant naming an unprotected setting, wherever the call is. A name the
// guard cannot read before the statement runs (a parameter, an expression,
// a subquery, a column) could name any setting, the role among them.
func (g *Guard) setConfig(call *pg_query.FuncCall) *Rejection {
	if call.FuncVariadic || call.AggStar || len(call.Args) != 3 {
		return setConfigRejection
	}
	name, value, _ := setConfigArgs(call)
	setting, ok := constantString(name)
	if !ok {
		return setConfigRejection
	}
	if g.policy.Protected(setting) {
		return rejection("set_config", fmt.Sprintf("set_config of %s is not allowed through rlsproxy: it carries the identity of the session", setting))
	}
	if strings.EqualFold(setting, "client_encoding") {
		encoding, ok := constantString(value)
		if !ok {
			return rejection("client_encoding", "client_encoding may be set through rlsproxy only to one constant encoding name")
		}
		if err := LexableEncoding(encoding); err != nil {
			return rejection("client_encoding", err.Error())
		}
	}
	return nil
}

// userSchema refuses a schema named after a role sessions run as: it would
// be the "$user" entry of the default search_path of every session of that
// role, ahead of public, and every user's unqualified names would resolve to
// objects of the one who created it. (rlsproxy sql reserves those names in
// the database; this is the same wall on the guard's side.)
func (g *Guard) userSchema(name string) *Rejection {
	if name != "" && slices.Contains(g.policy.Roles(), name) {
		return rejection("user_schema", fmt.Sprintf("a schema named %q is not allowed through rlsproxy: it is the \"$user\" schema of every session of role %s, where other users' unqualified names would find its objects first", name, name))
	}
	return nil
}

// setConfigArgs returns the arguments of a set_config call, by position or
// by name (nil where none is given).
func setConfigArgs(call *pg_query.FuncCall) (name, value, isLocal *pg_query.Node) {
	for i, arg := range call.Args {
		if na := arg.GetNamedArgExpr(); na != nil {
			switch strings.ToLower(na.Name) {
			case "setting_name":
				name = na.Arg
			case "new_value":
				value = na.Arg
			case "is_local":
				isLocal = na.Arg
			}
			continue
		}
		switch i {
		case 0:
			name = arg
		case 1:
			value = arg
		case 2:
			isLocal = arg
		}
	}
	return name, value, isLocal
}

// settingsRowCall recognises the one set_config whose name is a column that
// pg_dump sends (15.8, 14.13, 13.16 and later, every run):
//
//	SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings
//	WHERE name = 'restrict_nonsystem_relation_kind'
//
// The WHERE pins the name: set_config runs only for rows whose name equals
// the constant, so the call is the constant-name call it returns. Exactly
// this shape is accepted, and only for the settings pg_dump names this way:
// any other clause, relation, condition, argument or setting and the caller
// judges the statement as usual. "Equals" is the column type's equality,
// and pg_settings may be a relation of the session's own (a temporary one is
// searched first), whose name column could be char(n) (trailing spaces
// ignored), case-insensitive, or compared under a collation that ignores
// punctuation: so the constant is one whose look-alikes under any such
// equality name no protected setting, rather than any unprotected name.
func settingsRowCall(stmt *pg_query.Node) (*pg_query.FuncCall, bool) {
	sel := stmt.GetSelectStmt()
	if sel == nil || len(sel.TargetList) != 1 || len(sel.FromClause) != 1 {
		return nil, false
	}
	rest := proto.Clone(sel).(*pg_query.SelectStmt)
	rest.TargetList, rest.FromClause, rest.WhereClause = nil, nil, nil
	if !proto.Equal(rest, &pg_query.SelectStmt{LimitOption: pg_query.LimitOption_LIMIT_OPTION_DEFAULT, Op: pg_query.SetOperation_SETOP_NONE}) {
		return nil, false
	}
	rv := sel.FromClause[0].GetRangeVar()
	if rv == nil || rv.Relname != "pg_settings" || (rv.Schemaname != "" && rv.Schemaname != "pg_catalog") ||
		rv.Catalogname != "" || rv.Alias != nil || !rv.Inh {
		return nil, false
	}
	where := sel.WhereClause.GetAExpr()
	if where == nil || where.Kind != pg_query.A_Expr_Kind_AEXPR_OP || len(where.Name) != 1 ||
		where.Name[0].GetString_().GetSval() != "=" || !isNameColumn(where.Lexpr) {
		return nil, false
	}
	setting := where.Rexpr
	if name, ok := constantString(setting); !ok || !settingsPinnedByName[name] {
		return nil, false
	}
	target := sel.TargetList[0].GetResTarget()
	if target == nil || len(target.Indirection) != 0 {
		return nil, false
	}
	call := target.Val.GetFuncCall()
	if call == nil || !isSetConfig(call.Funcname) || call.AggOrder != nil || call.AggFilter != nil || call.Over != nil ||
		call.AggWithinGroup || call.AggStar || call.AggDistinct || call.FuncVariadic || len(call.Args) != 3 || !isNameColumn(call.Args[0]) {
		return nil, false
	}
	for _, arg := range call.Args[1:] {
		if arg.GetAConst() == nil && arg.GetTypeCast().GetArg().GetAConst() == nil {
			return nil, false
		}
	}
	return &pg_query.FuncCall{Funcname: call.Funcname, Args: []*pg_query.Node{setting, call.Args[1], call.Args[2]}}, true
}

// settingsPinnedByName are the settings settingsRowCall accepts.
var settingsPinnedByName = map[string]bool{"restrict_nonsystem_relation_kind": true}

// isNameColumn reports the bare column reference name.
func isNameColumn(n *pg_query.Node) bool {
	cr := n.GetColumnRef()
	return cr != nil && len(cr.Fields) == 1 && cr.Fields[0].GetString_().GetSval() == "name"
}

// isSetConfig reports set_config or pg_catalog.set_config.
func isSetConfig(name []*pg_query.Node) bool {
	switch len(name) {
	case 1:
		return strings.EqualFold(name[0].GetString_().GetSval(), "set_config")
	case 2:
		return name[0].GetString_().GetSval() == "pg_catalog" && strings.EqualFold(name[1].GetString_().GetSval(), "set_config")
	}
	return false
}

var setConfigRejection = rejection("set_config", "set_config is allowed through rlsproxy only with a constant setting name (it could otherwise change the role and the claim settings)")

// constantString returns the value of a string constant, also one cast to
// text or an unbounded varchar ('x'::text). Any other cast may change the
// value the server sees ('rolex'::varchar(4) is 'role', 'role '::char(5)
// too): such a constant is not one the guard can read.
func constantString(n *pg_query.Node) (string, bool) {
	if tc := n.GetTypeCast(); tc != nil {
		if !keepsText(tc.TypeName) {
			return "", false
		}
		n = tc.Arg
	}
	if c := n.GetAConst(); c != nil && c.GetSval() != nil {
		return c.GetSval().Sval, true
	}
	return "", false
}

// keepsText reports a cast that leaves a string as it is: to text or to
// varchar without a length, by their own or pg_catalog's names.
func keepsText(t *pg_query.TypeName) bool {
	if t == nil || len(t.Typmods) > 0 || len(t.ArrayBounds) > 0 || t.Setof || t.PctType || len(t.Names) == 0 || len(t.Names) > 2 {
		return false
	}
	if len(t.Names) == 2 && t.Names[0].GetString_().GetSval() != "pg_catalog" {
		return false
	}
	switch t.Names[len(t.Names)-1].GetString_().GetSval() {
	case "text", "varchar":
		return true
	}
	return false
}

// isReset reports a SET that puts a setting back to its session default.
func isReset(vs *pg_query.VariableSetStmt) bool {
	switch vs.Kind {
	case pg_query.VariableSetKind_VAR_RESET_ALL:
		return true
	case pg_query.VariableSetKind_VAR_RESET, pg_query.VariableSetKind_VAR_SET_DEFAULT:
		return vs.Name != "" && !strings.EqualFold(vs.Name, "transaction")
	}
	return false
}

// function is the rule for a call of the function name anywhere in a
// statement. attribute is set for the attribute notation x.f, which calls
// only one-argument functions: set_config and the *_to_xml family need more,
// so a column of that name read as x.set_config stays allowed.
func function(name string, attribute bool) *Rejection {
	name = strings.ToLower(name)
	switch {
	case !attribute && (strings.Contains(name, "_to_xml") || name == "ts_rewrite" || name == "connectby" || name == "xpath_table"),
		name == "ts_stat", strings.HasPrefix(name, "crosstab"):
		return rejection("query_executor", fmt.Sprintf("%s is not allowed through rlsproxy: it runs a query given as text", name)+allowCodeHint)
	case strings.HasPrefix(name, "dblink"):
		return rejection("foreign_connection", fmt.Sprintf("%s is not allowed through rlsproxy: it opens a connection as another user", name))
	case name == "pg_terminate_backend", name == "pg_cancel_backend":
		return rejection("signal_backend", fmt.Sprintf("%s is not allowed through rlsproxy: sessions of other users share your role", name))
	}
	return nil
}

// isSettingsView reports a relation that may be pg_catalog.pg_settings (an
// unqualified name finds pg_catalog first unless search_path says
// otherwise, which the client may).
func isSettingsView(rv *pg_query.RangeVar) bool {
	return rv != nil && strings.EqualFold(rv.Relname, "pg_settings") &&
		(rv.Schemaname == "" || strings.EqualFold(rv.Schemaname, "pg_catalog"))
}

// lexableEncodingArgs is the rule for SET client_encoding and SET NAMES: the
// server reads the session's next statements in that encoding, and the
// guard must read them the same way.
func lexableEncodingArgs(args []*pg_query.Node) *Rejection {
	if len(args) == 1 {
		if c := args[0].GetAConst(); c != nil && c.GetSval() != nil {
			if err := LexableEncoding(c.GetSval().Sval); err != nil {
				return rejection("client_encoding", err.Error())
			}
			return nil
		}
	}
	return rejection("client_encoding", "client_encoding may be set through rlsproxy only to one constant encoding name")
}

// hiddenCode are the rules AllowCode lifts: code the guard cannot see into.
var hiddenCode = map[string]bool{"do": true, "create_function": true, "alter_function": true,
	"trigger": true, "rule": true, "query_executor": true}

// allowCodeHint tells an operator what would let hidden code through.
const allowCodeHint = " (a proxy whose database enforces identity itself may pass such code: --guard-allow-code)"

func rejection(rule, msg string) *Rejection { return &Rejection{Rule: rule, Msg: msg, Kind: Forbidden} }

func reject(rule, msg string) Verdict { return Verdict{Reject: rejection(rule, msg)} }

// suspiciousWords are the words without which no statement can break a
// rule: every rule above needs one of them in the text. The scan folds case
// and reads through quotes and comments, so quoting or splitting with
// comments does not hide a word; U& identifiers are always parsed.
var suspiciousWords = map[string]bool{
	"set": true, "reset": true, "role": true, "authorization": true, "discard": true,
	"do": true, "create": true, "alter": true, "grant": true, "reassign": true, "load": true,
	"owner": true, "security": true, "policy": true, "set_config": true, "revoke": true, "drop": true,
	"ts_stat": true, "ts_rewrite": true, "connectby": true, "xpath_table": true,
	"pg_terminate_backend": true, "pg_cancel_backend": true,
}

// A wordSet selects the word lists a scan looks for: a guard parses the
// statements that hold a word of its rules (suspiciousWords and the names
// suspiciousWord matches by prefix or substring) or of its state rules
// (stateWords, state.go).
type wordSet uint8

const (
	forRules wordSet = 1 << iota
	forState
)

// scanWords maps every listed word to the lists that hold it: one lookup a
// word, whichever lists a guard scans for.
var scanWords = func() map[string]wordSet {
	m := make(map[string]wordSet, len(suspiciousWords)+len(stateWords))
	for w := range suspiciousWords {
		m[w] |= forRules
	}
	for w := range stateWords {
		m[w] |= forState
	}
	return m
}()

// holdsWord reports whether sql holds a word of the lists in which, or a U&
// escape that could spell one.
func holdsWord(sql []byte, which wordSet) bool {
	start := -1
	for i := 0; i <= len(sql); i++ {
		var c byte
		if i < len(sql) {
			c = sql[i]
		}
		// '$' separates words here, so dollar quotes ($$...$$) cannot glue
		// a word to a neighbour; no listed word holds a '$'.
		word := c == '_' || c >= 0x80 || (c|0x20 >= 'a' && c|0x20 <= 'z') || (c >= '0' && c <= '9')
		if word && i < len(sql) {
			if start < 0 {
				start = i
			}
			continue
		}
		if c == '&' && i > 0 && sql[i-1]|0x20 == 'u' {
			return true
		}
		if start >= 0 {
			if suspiciousWord(sql[start:i], which) {
				return true
			}
			start = -1
		}
	}
	return false
}

func suspiciousWord(w []byte, which wordSet) bool {
	if len(w) < 2 {
		return false
	}
	var buf [32]byte
	lw := buf[:0]
	for _, c := range w {
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		lw = append(lw, c) // beyond 32 bytes this grows on the heap: rare
	}
	if scanWords[string(lw)]&which != 0 { // no allocation: map lookup of a converted key
		return true
	}
	if which&forRules != 0 && (bytes.Contains(lw, []byte("_to_xml")) || bytes.HasPrefix(lw, []byte("crosstab")) || bytes.HasPrefix(lw, []byte("dblink"))) {
		return true
	}
	return which&forState != 0 && stateWordPrefix(lw)
}
