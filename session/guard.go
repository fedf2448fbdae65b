package session

import (
	"bytes"
	"container/list"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/rlsproxy/rlsproxy/internal/sandbox"
)

// This file holds every rule of the SQL guard: what a client may not send
// because it could change the session's identity or run code out of sight.
// Decisions come from PostgreSQL's own grammar (pg_query parses with the
// server's parser), never from regular expressions; a word scan keeps
// statements with nothing suspicious off the parser, and a bounded cache
// keeps repeated statement texts from being parsed twice.

// Rejection is a refused message: the rule it broke and what the client is told.
type Rejection struct {
	Rule string // label for metrics, e.g. "role"
	Msg  string
	// Code is the SQLSTATE: 42501, or 42601 when the text does not parse.
	Code string
}

// Verdict is the guard's decision on one message.
type Verdict struct {
	Reject *Rejection
	// Resets is set when the message resets the role or settings (RESET
	// ALL, DISCARD ALL, RESET ROLE, SET SESSION AUTHORIZATION DEFAULT):
	// it may pass, and the proxy re-establishes role and claims right after it.
	Resets bool
}

// Lexing is how the server reads a session's statements, as it reports
// it: the guard reads them the same way.
type Lexing struct {
	// NonStandardStrings is standard_conforming_strings off: a backslash
	// escapes in every string literal, not only in E'...'.
	NonStandardStrings bool
}

// Guard judges the statements clients send. It is safe for concurrent use.
type Guard struct {
	policy Policy
	// helpers parse long statements (guard_isolate.go); nil: all in process.
	helpers *sandbox.Pool
	limits  ParseLimits

	mu sync.Mutex
	// cache holds verdicts by statement text, one map per protocol (simple
	// Query, extended Parse) and way of reading string literals, in
	// least-recently-used order.
	cache [4]map[string]*list.Element
	lru   *list.List
	max   int
}

type cacheEntry struct {
	mode int
	sql  string
	v    Verdict
}

// maxCachedStatement bounds the texts kept in the cache: long texts are
// usually one-offs (bulk inserts) and would crowd out the repeated ones.
const maxCachedStatement = 4 << 10

// NewGuard returns a guard for the policy's protected settings, caching the
// verdicts of up to cacheSize statement texts.
func NewGuard(p Policy, cacheSize int) *Guard {
	return &Guard{policy: p, cache: [4]map[string]*list.Element{{}, {}, {}, {}}, lru: list.New(), max: cacheSize}
}

// Query judges a simple-protocol Query message, which may hold several
// statements: one forbidden statement rejects the whole message. Resets
// pass only as the trailing statements of the message, so that nothing runs
// between a reset and the proxy re-establishing the session. lex is how the
// server reads the session's statements.
func (g *Guard) Query(sql []byte, lex Lexing) Verdict { return g.judge(sql, false, lex) }

// Parse judges the statement of an extended-protocol Parse message. Resets
// are refused there: the statement may run later, any number of times, with
// other statements between, where the proxy cannot follow it.
func (g *Guard) Parse(sql []byte, lex Lexing) Verdict { return g.judge(sql, true, lex) }

// largeObjectFunctions are the functions libpq's large-object interface calls
// by OID with the FunctionCall message (pg_proc OIDs, stable across versions).
var largeObjectFunctions = map[uint32]string{
	952: "lo_open", 953: "lo_close", 954: "loread", 955: "lowrite", 956: "lo_lseek",
	957: "lo_creat", 958: "lo_tell", 964: "lo_unlink", 715: "lo_create", 1004: "lo_truncate",
	3170: "lo_lseek64", 3171: "lo_tell64", 3172: "lo_truncate64",
}

// FunctionCall judges a FunctionCall message, which calls a function by OID
// with no SQL at all (set_config is OID 2078). Only the large-object
// functions pass.
func (g *Guard) FunctionCall(oid uint32) Verdict {
	if _, ok := largeObjectFunctions[oid]; ok {
		return Verdict{}
	}
	return reject("function_call", fmt.Sprintf("the FunctionCall protocol message (function OID %d) is not allowed through rlsproxy; only large-object functions may be called that way", oid))
}

// judge takes the statement text as the bytes of the message, so that the
// common cases (nothing suspicious, or a cached text) allocate nothing.
func (g *Guard) judge(b []byte, extended bool, lex Lexing) Verdict {
	if !suspicious(b) {
		return Verdict{}
	}
	mode := 0
	if extended {
		mode = 1
	}
	if lex.NonStandardStrings {
		mode += 2
	}
	cacheable := len(b) <= maxCachedStatement && g.max > 0
	if cacheable {
		g.mu.Lock()
		if e, ok := g.cache[mode][string(b)]; ok {
			g.lru.MoveToFront(e)
			v := e.Value.(*cacheEntry).v
			g.mu.Unlock()
			return v
		}
		g.mu.Unlock()
	}
	sql := string(b)
	v := g.decide(sql, extended, lex)
	if cacheable {
		g.mu.Lock()
		if _, ok := g.cache[mode][sql]; !ok {
			g.cache[mode][sql] = g.lru.PushFront(&cacheEntry{mode, sql, v})
			if g.lru.Len() > g.max {
				old := g.lru.Remove(g.lru.Back()).(*cacheEntry)
				delete(g.cache[old.mode], old.sql)
			}
		}
		g.mu.Unlock()
	}
	return v
}

// decideHere parses sql as the server reads it and applies the rules to
// every node of every statement: under the reading lex names, which must
// parse, and under every other reading the server could apply (see
// readings.go), each of which either fails to lex (the server would refuse
// the statement read so) or must parse and get the same verdict.
func (g *Guard) decideHere(sql string, extended bool, lex Lexing) Verdict {
	if nonASCIIDollarTag(sql) {
		return reject("dollar_quote", "dollar-quoted strings with non-ASCII tags are not allowed through rlsproxy: the server matches tags after converting the statement to its encoding, where different characters can become one; use an ASCII tag ($$ or $x$)")
	}
	raw := sql
	if !utf8.ValidString(sql) {
		// Not UTF-8: a session in another ASCII-safe encoding (LATIN1,
		// EUC_JP, ...), where every byte from 0x80 up belongs to a
		// non-ASCII character, as the lexer sees it once the server has
		// converted it. (A UTF8 session's server refuses such bytes.)
		sql = maskHighBytes(sql)
	}
	tree, err := parseTree(sql, lex.NonStandardStrings)
	if err != nil {
		// PostgreSQL would refuse it too; refusing here keeps a text the
		// guard cannot read from ever reaching the server.
		return Verdict{Reject: &Rejection{Rule: "parse_error", Code: "42601", Msg: err.Error()}}
	}
	v := g.verdict(tree, extended)
	if v.Reject != nil {
		return v
	}
	for _, r := range otherReadings(raw, sql, lex) {
		other, err := parseTree(r.sql, r.scsOff)
		if err != nil {
			if !lexes(r.sql, r.scsOff) {
				continue // the server's lexer refuses the statement read so
			}
			// It splits into tokens but does not parse: the server, whose
			// grammar is not pg_query's (PostgreSQL 17's), might run it.
			return reject("string_reading", "the statement reads as other SQL "+r.why+", which rlsproxy's parser cannot check: "+err.Error())
		}
		if ov := g.verdict(other, extended); ov != v {
			if ov.Reject != nil {
				return Verdict{Reject: rejection(ov.Reject.Rule, ov.Reject.Msg+" (read as the server does "+r.why+")")}
			}
			return reject("string_reading", "the statement does different things read as the server does "+r.why+": rlsproxy does not pass it")
		}
	}
	return v
}

func onOff(off bool) string {
	if off {
		return "off"
	}
	return "on"
}

// verdict applies the rules to every statement of a parse tree.
func (g *Guard) verdict(tree *pg_query.ParseResult, extended bool) Verdict {
	var v Verdict
	copyIn := false
	for i, raw := range tree.Stmts {
		if c := raw.Stmt.GetCopyStmt(); c != nil && c.IsFrom && c.Filename == "" {
			copyIn = true
		}
		resets, rej := g.statement(raw.Stmt)
		if rej != nil {
			return Verdict{Reject: rej}
		}
		if resets {
			if extended {
				return reject("reset_in_extended_protocol", "RESET ALL, DISCARD ALL, RESET ROLE and SET SESSION AUTHORIZATION DEFAULT are allowed through rlsproxy only as a simple query, not as a prepared statement")
			}
			v.Resets = true
		} else if v.Resets {
			return reject("reset_position", fmt.Sprintf("statement %d follows a reset of the role or settings in the same message; through rlsproxy a reset must be the last statement of its message", i+1))
		}
	}
	if v.Resets && copyIn {
		// The client waits after a reset until the session is
		// re-established, and the server would wait for its COPY data.
		return reject("reset_position", "a reset of the role or settings cannot share its message with COPY ... FROM STDIN through rlsproxy: send it as a message of its own")
	}
	return v
}

// statement applies the rules to one statement and everything inside it.
func (g *Guard) statement(stmt *pg_query.Node) (resets bool, rej *Rejection) {
	if vs := stmt.GetVariableSetStmt(); vs != nil {
		resets = vs.Kind == pg_query.VariableSetKind_VAR_RESET_ALL || (isReset(vs) && g.policy.Protected(vs.Name))
	}
	if d := stmt.GetDiscardStmt(); d != nil && d.Target == pg_query.DiscardMode_DISCARD_ALL {
		resets = true
	}
	walk(stmt.ProtoReflect(), func(m protoreflect.Message) bool {
		rej = g.node(m.Interface())
		return rej == nil
	})
	return resets, rej
}

// node is the rule for one parse-tree node.
func (g *Guard) node(n any) *Rejection {
	switch n := n.(type) {
	case *pg_query.VariableSetStmt:
		return g.setting(n)
	case *pg_query.FuncCall:
		if len(n.Funcname) > 0 {
			return function(n.Funcname[len(n.Funcname)-1].GetString_().GetSval(), false)
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
		return rejection("do", "DO blocks are not allowed through rlsproxy: they run code the guard cannot see")
	case *pg_query.CreateFunctionStmt:
		return rejection("create_function", "creating functions or procedures is not allowed through rlsproxy")
	case *pg_query.AlterFunctionStmt:
		return rejection("alter_function", "altering functions or procedures is not allowed through rlsproxy")
	case *pg_query.CreateTrigStmt, *pg_query.CreateEventTrigStmt, *pg_query.AlterEventTrigStmt:
		return rejection("trigger", "creating or altering triggers is not allowed through rlsproxy")
	case *pg_query.RuleStmt:
		return rejection("rule", "creating rules is not allowed through rlsproxy")
	case *pg_query.CreateRoleStmt, *pg_query.AlterRoleStmt, *pg_query.AlterRoleSetStmt, *pg_query.DropRoleStmt,
		*pg_query.GrantRoleStmt, *pg_query.ReassignOwnedStmt, *pg_query.AlterOwnerStmt:
		return rejection("alter_role", "changing roles, role memberships or ownership is not allowed through rlsproxy")
	case *pg_query.RenameStmt:
		if n.RenameType == pg_query.ObjectType_OBJECT_ROLE {
			return rejection("alter_role", "changing roles, role memberships or ownership is not allowed through rlsproxy")
		}
	case *pg_query.CreateSchemaStmt:
		if n.Authrole != nil {
			return rejection("alter_role", "creating objects owned by another role (CREATE SCHEMA ... AUTHORIZATION) is not allowed through rlsproxy")
		}
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
	case *pg_query.DefineStmt, *pg_query.CreateCastStmt, *pg_query.CreateTransformStmt, *pg_query.CreateConversionStmt,
		*pg_query.CreateOpClassStmt, *pg_query.CreateOpFamilyStmt, *pg_query.CreatePLangStmt,
		*pg_query.CreateExtensionStmt, *pg_query.AlterExtensionStmt, *pg_query.AlterExtensionContentsStmt, *pg_query.LoadStmt:
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
	case name == "set_config" && !attribute:
		return rejection("set_config", "set_config is not allowed through rlsproxy: it can change the role and the claim settings")
	case !attribute && (strings.Contains(name, "_to_xml") || name == "ts_rewrite" || name == "connectby" || name == "xpath_table"),
		name == "ts_stat", strings.HasPrefix(name, "crosstab"):
		return rejection("query_executor", fmt.Sprintf("%s is not allowed through rlsproxy: it runs a query given as text", name))
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

func rejection(rule, msg string) *Rejection { return &Rejection{Rule: rule, Msg: msg, Code: "42501"} }

func reject(rule, msg string) Verdict { return Verdict{Reject: rejection(rule, msg)} }

// walk visits m and every message below it, depth first, until visit
// returns false.
func walk(m protoreflect.Message, visit func(protoreflect.Message) bool) bool {
	if !m.IsValid() {
		return true
	}
	if !visit(m) {
		return false
	}
	ok := true
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind {
			return true
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len() && ok; i++ {
				ok = walk(l.Get(i).Message(), visit)
			}
		case fd.IsMap():
		default:
			ok = walk(v.Message(), visit)
		}
		return ok
	})
	return ok
}

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

// suspicious reports whether sql holds a word any rule needs, or a U&
// escape that could spell one.
func suspicious(sql []byte) bool {
	start := -1
	for i := 0; i <= len(sql); i++ {
		var c byte
		if i < len(sql) {
			c = sql[i]
		}
		// '$' separates words here, so dollar quotes ($$...$$) cannot glue
		// a word to a neighbour; no rule's word holds a '$'.
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
			if suspiciousWord(sql[start:i]) {
				return true
			}
			start = -1
		}
	}
	return false
}

func suspiciousWord(w []byte) bool {
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
	return suspiciousWords[string(lw)] || // no allocation: map lookup of a converted key
		bytes.Contains(lw, []byte("_to_xml")) || bytes.HasPrefix(lw, []byte("crosstab")) || bytes.HasPrefix(lw, []byte("dblink"))
}
