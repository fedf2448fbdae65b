// Package guard judges the SQL a client sends through the proxy: it refuses
// what could change the session's identity or run code out of sight
// (rules.go holds every rule), reading each statement as the server could
// (readings.go), parsing with PostgreSQL's own grammar (parse.go), long
// statements in helper processes (isolate.go). Decisions come from parse
// trees, never from regular expressions; a word scan keeps statements with
// nothing suspicious off the parser, and a bounded cache keeps repeated
// texts from being parsed twice.
package guard

import (
	"fmt"
	"strings"
	"unicode/utf8"
	"unsafe"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/rlsproxy/rlsproxy/internal/lru"
	"github.com/rlsproxy/rlsproxy/internal/sandbox"
	"github.com/rlsproxy/rlsproxy/session"
)

// Kind says why a message is refused; the proxy tells the client a SQLSTATE
// for each (proxy/errors.go).
type Kind int

const (
	// Forbidden: it could change the session's identity or run code out
	// of the guard's sight.
	Forbidden Kind = iota
	// Unreadable: it does not parse.
	Unreadable
	// TooCostly: checking it is beyond the guard's limits.
	TooCostly
)

// Rejection is a refused message: the rule it broke and what the client is
// told.
type Rejection struct {
	Rule string // label for metrics, e.g. "role"
	Msg  string
	Kind Kind
}

func (r *Rejection) Error() string { return r.Msg }

// Verdict is the guard's decision on one message.
type Verdict struct {
	Reject *Rejection
	// Resets is set when the message resets the role or settings (RESET
	// ALL, DISCARD ALL, RESET ROLE, SET SESSION AUTHORIZATION DEFAULT):
	// it may pass, and the proxy re-establishes role and claims right after it.
	Resets bool

	// With TrackState, what the message leaves in its backend for the
	// proxy's transaction pooling (state.go); a Parse's statement leaves it
	// each time it runs. A rejected message has none of it: it never runs.

	// Pin says why the message ties its client to its backend for the
	// rest of the session: one of the Pin* reasons, the first the message
	// gives. Empty: nothing it leaves behind would be missed by a later
	// transaction of the client on another backend.
	Pin string
	// Deallocate names the prepared statements of its DEALLOCATE name
	// statements, in order, separated by NUL bytes (which no name holds):
	// DeallocatedNames splits them. DeallocateAll is a DEALLOCATE ALL.
	Deallocate    string
	DeallocateAll bool
	// DeallocateMixed: the message holds other statements besides its
	// DEALLOCATE name statements.
	DeallocateMixed bool
	// Executes names the prepared statements its EXECUTE statements run
	// (also under EXPLAIN and CREATE TABLE AS), in order, separated by NUL
	// bytes: ExecutedNames splits them. Prepares names those its SQL
	// PREPARE statements make, likewise (PreparedNames).
	Executes, Prepares string
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
	policy session.Policy
	// helpers parse long statements (isolate.go); nil: all in process.
	helpers *sandbox.Pool
	limits  ParseLimits
	// verdicts remembers the verdicts of statement texts, by protocol
	// (simple Query, extended Parse) and way of reading string literals.
	verdicts *lru.Cache[cacheKey, Verdict]
	// allowCode passes code the guard cannot see into (AllowCode).
	allowCode bool
	// trackState reports what messages leave in their backend (TrackState);
	// noRules applies no rule (NoRules).
	trackState, noRules bool
	// words are the word lists a statement needs one word of to be parsed.
	words wordSet
}

// An Option changes a guard.
type Option func(*Guard)

// AllowCode passes code the guard cannot see into: DO blocks, functions and
// procedures (pg_temp ones included), triggers, rules, and the built-ins
// that run a query given as text. Such code can do whatever a statement of
// the session could, so this is safe only where the database enforces
// identity on its own: a login role that can reach no role but its mapped
// one, and signed claims (README, "Security").
func AllowCode(g *Guard) { g.allowCode = true }

// AllowsCode reports whether the guard was built with AllowCode.
func (g *Guard) AllowsCode() bool { return g.allowCode }

// TrackState makes the guard report what each message leaves in its backend
// (Verdict.Pin, Deallocate, DeallocateAll), for transaction pooling, where a
// client's transactions may run on different backends. It parses the
// statements that hold a word of a state rule (state.go) as well as those
// that hold a word of a rule; ordinary statements still skip the parser.
func TrackState(g *Guard) { g.trackState = true }

// NoRules is the guard of --guard off under transaction pooling: no rule
// applies and every message passes, one the guard cannot read or is not
// allowed to parse included (pinned, PinUnparsed), and the guard only tracks
// state: it implies TrackState. Resets is still reported, so that the proxy
// re-establishes role and claims after a reset, but wherever it is.
func NoRules(g *Guard) { g.noRules, g.trackState = true, true }

// TracksState reports whether the guard was built with TrackState (or
// NoRules): transaction pooling needs its verdicts' Pin and Deallocate.
func (g *Guard) TracksState() bool { return g.trackState }

type cacheKey struct {
	mode uint8
	sql  string
}

// maxCachedStatement bounds the texts kept in the cache: long texts are
// usually one-offs (bulk inserts) and would crowd out the repeated ones.
const maxCachedStatement = 4 << 10

// New returns a guard for the policy's protected settings, caching the
// verdicts of up to cacheSize statement texts.
func New(p session.Policy, cacheSize int, opts ...Option) *Guard {
	g := &Guard{policy: p, verdicts: lru.New[cacheKey, Verdict](cacheSize)}
	for _, o := range opts {
		o(g)
	}
	if !g.noRules {
		g.words |= forRules
	}
	if g.trackState {
		g.words |= forState
	}
	return g
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

// FunctionCall judges a FunctionCall message, which calls a function by OID
// with no SQL at all (set_config is OID 2078). Only the large-object
// functions pass.
func (g *Guard) FunctionCall(oid uint32) Verdict {
	if _, ok := largeObjectFunctions[oid]; ok {
		return Verdict{}
	}
	if g.noRules {
		return Verdict{Pin: functionCallPin(oid)}
	}
	return reject("function_call", fmt.Sprintf("the FunctionCall protocol message (function OID %d) is not allowed through rlsproxy; only large-object functions may be called that way", oid))
}

// judge takes the statement text as the bytes of the message, so that the
// common cases (nothing suspicious, or a cached text) allocate nothing.
func (g *Guard) judge(b []byte, extended bool, lex Lexing) Verdict {
	if !holdsWord(b, g.words) {
		return Verdict{}
	}
	var mode uint8
	if extended {
		mode = 1
	}
	if lex.NonStandardStrings {
		mode += 2
	}
	cacheable := len(b) <= maxCachedStatement
	if cacheable {
		// The lookup's key borrows b's bytes: the cache keeps no key it
		// was only asked for.
		if v, ok := g.verdicts.Get(cacheKey{mode, unsafe.String(unsafe.SliceData(b), len(b))}); ok {
			return v
		}
	}
	sql := string(b)
	v := g.decide(sql, extended, lex)
	if cacheable {
		g.verdicts.Add(cacheKey{mode, sql}, v)
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
		if g.noRules {
			return Verdict{Pin: PinUnparsed}
		}
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
		if g.noRules {
			// PostgreSQL would most likely refuse it too, but its
			// grammar is not pg_query's.
			return Verdict{Pin: PinUnparsed}
		}
		// PostgreSQL would refuse it too; refusing here keeps a text the
		// guard cannot read from ever reaching the server.
		return Verdict{Reject: &Rejection{Rule: "parse_error", Kind: Unreadable, Msg: err.Error()}}
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
			if g.noRules {
				return unsure(v, Verdict{})
			}
			// It splits into tokens but does not parse: the server, whose
			// grammar is not pg_query's (PostgreSQL 17's), might run it.
			return reject("string_reading", "the statement reads as other SQL "+r.why+", which rlsproxy's parser cannot check: "+err.Error())
		}
		if ov := g.verdict(other, extended); ov != v {
			if g.noRules {
				v = unsure(v, ov)
				continue
			}
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
		if g.trackState {
			g.track(raw.Stmt, &v)
		}
		switch {
		case resets && extended && !g.noRules:
			return reject("reset_in_extended_protocol", "RESET ALL, DISCARD ALL, RESET ROLE and SET SESSION AUTHORIZATION DEFAULT are allowed through rlsproxy only as a simple query, not as a prepared statement")
		case resets && extended:
			// It runs when executed, where the proxy cannot put role and
			// claims back right after it: the client keeps its backend,
			// which is reset when the session ends.
			if v.Pin == "" {
				v.Pin = PinPreparedReset
			}
		case resets:
			v.Resets = true
		case v.Resets && !g.noRules:
			return reject("reset_position", fmt.Sprintf("statement %d follows a reset of the role or settings in the same message; through rlsproxy a reset must be the last statement of its message", i+1))
		}
	}
	if v.Deallocate != "" && len(tree.Stmts) > strings.Count(v.Deallocate, "\x00")+1 {
		v.DeallocateMixed = true
	}
	if v.Resets && copyIn && !g.noRules {
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
	if g.noRules {
		return resets, nil
	}
	if call, ok := settingsRowCall(stmt); ok {
		return false, g.setConfig(call)
	}
	walk(stmt.ProtoReflect(), func(m protoreflect.Message) bool {
		rej = g.node(m.Interface())
		if rej != nil && g.allowCode && hiddenCode[rej.Rule] {
			rej = nil
		}
		return rej == nil
	})
	return resets, rej
}

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
