package guard

import (
	"slices"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"github.com/rlsproxy/rlsproxy/session"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// This file holds the state rules (TrackState, NoRules): what a statement
// leaves in its backend that a later transaction of the same client would
// miss on another backend, for the proxy's transaction pooling (issue 11).
// A client that sends such a statement is pinned to its backend for the rest
// of its session. DEALLOCATE pins nothing but is reported: the proxy renames
// the protocol's prepared statements per backend and must follow it.
//
// The rules read the statement, never the code it reaches: state left by a
// function or procedure the database runs for it (one that runs SET, LISTEN
// or pg_advisory_lock, called by name, through a view, a trigger or a column
// default) goes unseen; so do currval and lastval, which a later transaction
// on another backend cannot read. A DO block, whose code the client writes
// at the statement, pins. Nothing unpins: DISCARD ALL, UNLISTEN or
// pg_advisory_unlock after a pinning statement leave the client pinned.

// Pin reasons, Verdict.Pin's values (labels for metrics and logs).
const (
	// PinSet: a setting changed for the session and not carried by the
	// proxy: SET or SET SESSION, set_config(name, value, false), UPDATE
	// pg_settings. The proxy carries the settings the server reports
	// (session.CarriedSettings), and installs role and claims on every backend it
	// hands out (settingPins); SET LOCAL, RESET and SET ... TO DEFAULT
	// change nothing a later transaction sees, as the pooled backends
	// share their defaults.
	PinSet = "set"
	// PinSessionCharacteristics: SET SESSION CHARACTERISTICS AS
	// TRANSACTION, the defaults of later transactions.
	PinSessionCharacteristics = "session_characteristics"
	// PinListen: LISTEN; notifications arrive at the backend that listens.
	PinListen = "listen"
	// PinTempObject: a temporary table, view, sequence, type, domain or
	// function (TEMP, TEMPORARY, or created in pg_temp), but not a table
	// created ON COMMIT DROP.
	PinTempObject = "temp_object"
	// PinHoldCursor: DECLARE ... CURSOR WITH HOLD, which outlives its
	// transaction.
	PinHoldCursor = "hold_cursor"
	// PinAdvisoryLock: a session-level advisory lock (pg_advisory_lock,
	// pg_try_advisory_lock and their _shared forms), held until unlocked
	// or the session ends. The _xact_ forms end with their transaction.
	PinAdvisoryLock = "advisory_lock"
	// PinPrepare: SQL PREPARE, a statement prepared for the session.
	PinPrepare = "prepare"
	// PinLoad: LOAD, a library loaded into the backend.
	PinLoad = "load"
	// PinCode: a DO block, whose code may do any of the above out of the
	// guard's sight (it passes with AllowCode or NoRules only).
	PinCode = "code"
	// PinDblink: dblink_connect, a connection kept by the session (with
	// NoRules only: the rules refuse dblink).
	PinDblink = "dblink"
	// PinPreparedReset: with NoRules, a reset (DISCARD ALL, RESET ROLE,
	// ...) in a Parse: it runs at each Execute, where the proxy cannot
	// re-install role and claims right after it as it does after a Query.
	PinPreparedReset = "prepared_reset"
	// PinUnparsed: with NoRules, a message the guard cannot read, so
	// cannot tell what it leaves: it does not parse, its readings
	// (readings.go) disagree, or it is beyond the guard's parse limits.
	PinUnparsed = "unparsed"
)

// stateWords are the words without which no statement can leave state
// behind, or run a prepared statement by name (Verdict.Executes): every
// state rule needs one in the text (the scan, holdsWord in rules.go, reads
// them as it reads suspiciousWords; stateWordPrefix matches pg_temp_<n>).
// Resets need reset, discard or set.
var stateWords = map[string]bool{
	"set": true, "set_config": true, "reset": true, "discard": true,
	"listen": true, "temp": true, "temporary": true, "pg_temp": true, "hold": true,
	"prepare": true, "deallocate": true, "execute": true, "load": true, "do": true,
	"pg_advisory_lock": true, "pg_advisory_lock_shared": true,
	"pg_try_advisory_lock": true, "pg_try_advisory_lock_shared": true,
	"dblink_connect": true, "dblink_connect_u": true,
}

// stateWordPrefix reports a lowercase word that names a temporary schema by
// number (pg_temp_3), which the session's own is.
func stateWordPrefix(lw []byte) bool { return strings.HasPrefix(string(lw), "pg_temp_") }

// sessionFunctions are the built-ins that leave state behind in the session
// whatever their arguments, by lowercase name (any schema: a function of
// that name elsewhere pins too). Each has a one-argument form, so attribute
// notation, x.pg_advisory_lock, calls it as well.
var sessionFunctions = map[string]string{
	"pg_advisory_lock": PinAdvisoryLock, "pg_advisory_lock_shared": PinAdvisoryLock,
	"pg_try_advisory_lock": PinAdvisoryLock, "pg_try_advisory_lock_shared": PinAdvisoryLock,
	"dblink_connect": PinDblink, "dblink_connect_u": PinDblink,
}

// functionCallPin is the state rule for the FunctionCall message, which
// passes only with NoRules (large-object functions aside, whose descriptors
// end with their transaction): set_config and the session advisory locks by
// their pg_proc OIDs. Any other function is a function call the guard cannot
// judge, as in SQL.
func functionCallPin(oid uint32) string {
	switch oid {
	case 2078:
		return PinSet // arguments unread: pinned whatever they are
	case 2880, 2881, 2882, 2883, 2886, 2887, 2888, 2889:
		return PinAdvisoryLock
	}
	return ""
}

// track adds what one statement leaves in its backend to v: its pin reason
// unless v has one, and its DEALLOCATE.
func (g *Guard) track(stmt *pg_query.Node, v *Verdict) {
	if d := stmt.GetDiscardStmt(); d != nil && d.Target == pg_query.DiscardMode_DISCARD_ALL {
		// It deallocates every prepared statement too, as DEALLOCATE ALL.
		v.DeallocateAll = true
		return
	}
	if d := stmt.GetDeallocateStmt(); d != nil {
		if d.Isall {
			v.DeallocateAll = true
		} else if v.Deallocate == "" {
			v.Deallocate = d.Name
		} else {
			v.Deallocate += "\x00" + d.Name
		}
		return
	}
	if name := executed(stmt); name != "" {
		v.Executes = appendName(v.Executes, name)
	}
	if p := stmt.GetPrepareStmt(); p != nil {
		v.Prepares = appendName(v.Prepares, p.Name)
	}
	if v.Pin == "" {
		v.Pin = g.pin(stmt)
	}
}

// appendName adds name to a NUL-separated list of names.
func appendName(list, name string) string {
	if list == "" {
		return name
	}
	return list + "\x00" + name
}

// executed is the name of the prepared statement stmt runs with EXECUTE,
// itself or under EXPLAIN or CREATE TABLE AS (the only statements that
// take one); "" if none.
func executed(stmt *pg_query.Node) string {
	if e := stmt.GetExplainStmt(); e != nil {
		stmt = e.GetQuery()
	}
	if c := stmt.GetCreateTableAsStmt(); c != nil {
		stmt = c.GetQuery()
	}
	return stmt.GetExecuteStmt().GetName()
}

// unsure is the verdict, with NoRules, on a message whose readings disagree
// (other is zero when one of them does not parse): the guard's own reading's
// effects, pinned, and a reset if either reading resets, as re-establishing
// role and claims costs a round trip at most.
func unsure(own, other Verdict) Verdict {
	own.Pin = PinUnparsed
	own.Resets = own.Resets || other.Resets
	return own
}

// DeallocatedNames returns the names of Deallocate, in order.
func (v Verdict) DeallocatedNames() []string {
	if v.Deallocate == "" {
		return nil
	}
	return strings.Split(v.Deallocate, "\x00")
}

// ExecutedNames returns the names of Executes, in order.
func (v Verdict) ExecutedNames() []string { return splitNames(v.Executes) }

// PreparedNames returns the names of Prepares, in order.
func (v Verdict) PreparedNames() []string { return splitNames(v.Prepares) }

func splitNames(list string) []string {
	if list == "" {
		return nil
	}
	return strings.Split(list, "\x00")
}

// pin is the state rule for one statement, by its kind: the statements that
// can leave state only as a whole are judged here, and every other one by
// the calls and INTO clauses anywhere inside it (pinInside).
func (g *Guard) pin(stmt *pg_query.Node) string {
	switch n := stmt.Node.(type) {
	case *pg_query.Node_VariableSetStmt:
		// Only here: a SET nested in another statement (CREATE FUNCTION
		// ... SET, ALTER ROLE ... SET, ALTER SYSTEM) is no session's.
		return g.settingPin(n.VariableSetStmt)
	case *pg_query.Node_ListenStmt:
		return PinListen
	case *pg_query.Node_DeclareCursorStmt:
		if n.DeclareCursorStmt.Options&cursorOptHold != 0 {
			return PinHoldCursor
		}
	case *pg_query.Node_PrepareStmt:
		return PinPrepare
	case *pg_query.Node_LoadStmt:
		return PinLoad
	case *pg_query.Node_DoStmt:
		return PinCode
	case *pg_query.Node_ExplainStmt:
		if !explainRuns(n.ExplainStmt) {
			return "" // it only plans
		}
		return g.pin(n.ExplainStmt.Query)
	case *pg_query.Node_UpdateStmt:
		if isSettingsView(n.UpdateStmt.Relation) {
			return PinSet // its rule calls set_config(name, setting, false)
		}
	case *pg_query.Node_MergeStmt:
		if isSettingsView(n.MergeStmt.Relation) {
			return PinSet
		}
	case *pg_query.Node_CreateStmt:
		c := n.CreateStmt
		if tempRelation(c.Relation) && c.Oncommit != pg_query.OnCommitAction_ONCOMMIT_DROP {
			return PinTempObject
		}
	case *pg_query.Node_CreateSeqStmt:
		if tempRelation(n.CreateSeqStmt.Sequence) {
			return PinTempObject
		}
	case *pg_query.Node_CompositeTypeStmt:
		if tempRelation(n.CompositeTypeStmt.Typevar) {
			return PinTempObject
		}
	case *pg_query.Node_CreateEnumStmt:
		return tempObject(n.CreateEnumStmt.TypeName)
	case *pg_query.Node_CreateRangeStmt:
		return tempObject(n.CreateRangeStmt.TypeName)
	case *pg_query.Node_DefineStmt: // aggregates, operators, base types, collations
		return tempObject(n.DefineStmt.Defnames)
	// The statements below store expressions to run later: only what
	// they create can pin.
	case *pg_query.Node_ViewStmt:
		if tempRelation(n.ViewStmt.View) {
			return PinTempObject
		}
		return ""
	case *pg_query.Node_CreateFunctionStmt:
		return tempObject(n.CreateFunctionStmt.Funcname)
	case *pg_query.Node_CreateDomainStmt:
		return tempObject(n.CreateDomainStmt.Domainname)
	case *pg_query.Node_RuleStmt, *pg_query.Node_CreateTrigStmt, *pg_query.Node_CreatePolicyStmt, *pg_query.Node_AlterPolicyStmt:
		return ""
	}
	return g.pinInside(stmt)
}

// cursorOptHold is CURSOR_OPT_HOLD (nodes/parsenodes.h).
const cursorOptHold = 0x20

// pinInside is the state rule for what a statement runs anywhere inside it:
// the session functions, set_config, and SELECT ... INTO or CREATE TABLE ...
// AS a temporary table.
func (g *Guard) pinInside(stmt *pg_query.Node) string {
	var pin string
	walk(stmt.ProtoReflect(), func(m protoreflect.Message) bool {
		switch n := m.Interface().(type) {
		case *pg_query.FuncCall:
			if len(n.Funcname) > 0 {
				name := strings.ToLower(n.Funcname[len(n.Funcname)-1].GetString_().GetSval())
				if name == "set_config" {
					pin = g.setConfigPin(n)
				} else {
					pin = sessionFunctions[name]
				}
			}
		case *pg_query.A_Indirection:
			// (expr).f is PostgreSQL's attribute notation for f(expr).
			for _, ind := range n.Indirection {
				if s := ind.GetString_(); s != nil && pin == "" {
					pin = sessionFunctions[strings.ToLower(s.Sval)]
				}
			}
		case *pg_query.ColumnRef:
			// So is x.f, when x is a table or column and no column f exists.
			if len(n.Fields) >= 2 {
				pin = sessionFunctions[strings.ToLower(n.Fields[len(n.Fields)-1].GetString_().GetSval())]
			}
		case *pg_query.IntoClause:
			if tempRelation(n.Rel) && n.OnCommit != pg_query.OnCommitAction_ONCOMMIT_DROP {
				pin = PinTempObject
			}
		}
		return pin == ""
	})
	return pin
}

// settingPin is the state rule for SET, SET SESSION, SET LOCAL and RESET.
func (g *Guard) settingPin(vs *pg_query.VariableSetStmt) string {
	if vs.IsLocal {
		return ""
	}
	switch vs.Kind {
	case pg_query.VariableSetKind_VAR_SET_VALUE, pg_query.VariableSetKind_VAR_SET_CURRENT:
		if g.settingPins(vs.Name) {
			return PinSet
		}
	case pg_query.VariableSetKind_VAR_SET_MULTI:
		// SET TRANSACTION [SNAPSHOT] is the transaction's own.
		if vs.Name == "SESSION CHARACTERISTICS" {
			return PinSessionCharacteristics
		}
	}
	return ""
}

// setConfigPin is the state rule for set_config(setting_name, new_value,
// is_local): it pins unless is_local is a constant true or the name a
// constant the proxy carries. A call the server would refuse (arguments
// missing, VARIADIC) pins as well: the guard does not second-guess it.
func (g *Guard) setConfigPin(call *pg_query.FuncCall) string {
	if call.FuncVariadic || call.AggStar || len(call.Args) != 3 {
		return PinSet
	}
	name, _, isLocal := setConfigArgs(call)
	if constantTrue(isLocal) {
		return ""
	}
	if setting, ok := constantString(name); ok && !g.settingPins(setting) {
		return ""
	}
	return PinSet
}

// settingPins reports whether setting a setting for the session pins: not
// the settings the proxy carries (session.CarriedSettings), nor the role and the
// claims, which it installs on every backend it hands out (the rules refuse
// to change them anyway; with NoRules a change is lost at the client's next
// transaction, never carried to another client), nor the settings of the
// current transaction alone, whatever SET says.
func (g *Guard) settingPins(setting string) bool {
	carried := slices.ContainsFunc(session.CarriedSettings, func(name string) bool { return strings.EqualFold(name, setting) })
	return !carried && !transactionSettings[strings.ToLower(setting)] && !g.policy.Protected(setting)
}

// transactionSettings are the settings of one transaction: set for the
// session, they still end with it.
var transactionSettings = map[string]bool{
	"transaction_isolation": true, "transaction_read_only": true, "transaction_deferrable": true,
}

// constantTrue reports a boolean constant true as the server reads one: the
// keyword, or a string boolin takes for true, cast to boolean or not.
func constantTrue(n *pg_query.Node) bool {
	for tc := n.GetTypeCast(); tc != nil; tc = n.GetTypeCast() {
		if !isBoolType(tc.TypeName) {
			return false
		}
		n = tc.Arg
	}
	c := n.GetAConst()
	switch {
	case c == nil || c.Isnull:
		return false
	case c.GetBoolval() != nil:
		return c.GetBoolval().Boolval
	case c.GetSval() != nil:
		return boolTrue(c.GetSval().Sval)
	}
	return false
}

// boolTrue reports the strings parse_bool (utils/adt/bool.c) reads as true:
// a prefix of "true" or "yes", "on" or "1", any case, within white space.
func boolTrue(s string) bool {
	s = strings.ToLower(strings.Trim(s, " \t\n\r\v\f"))
	switch {
	case s == "":
		return false
	case s[0] == 't':
		return strings.HasPrefix("true", s)
	case s[0] == 'y':
		return strings.HasPrefix("yes", s)
	}
	return s == "on" || s == "1"
}

// isBoolType reports the type boolean, as bool or pg_catalog.bool.
func isBoolType(tn *pg_query.TypeName) bool {
	if tn == nil || tn.Setof || tn.PctType || len(tn.Typmods) > 0 || len(tn.ArrayBounds) > 0 {
		return false
	}
	switch len(tn.Names) {
	case 1:
		return tn.Names[0].GetString_().GetSval() == "bool"
	case 2:
		return tn.Names[0].GetString_().GetSval() == "pg_catalog" && tn.Names[1].GetString_().GetSval() == "bool"
	}
	return false
}

// explainRuns reports an EXPLAIN that runs its statement: ANALYZE, unless
// every ANALYZE option is explicitly off (defGetBoolean: false, off, 0).
func explainRuns(ex *pg_query.ExplainStmt) bool {
	for _, o := range ex.Options {
		d := o.GetDefElem()
		if d == nil || !strings.EqualFold(d.Defname, "analyze") {
			continue
		}
		off := d.Arg != nil && (d.Arg.GetInteger() != nil && d.Arg.GetInteger().Ival == 0 ||
			d.Arg.GetString_() != nil && (strings.EqualFold(d.Arg.GetString_().Sval, "false") || strings.EqualFold(d.Arg.GetString_().Sval, "off")))
		if !off {
			return true
		}
	}
	return false
}

// tempRelation reports a relation (or composite type) created temporary:
// TEMP or TEMPORARY, or in a temporary schema.
func tempRelation(rv *pg_query.RangeVar) bool {
	return rv != nil && (rv.Relpersistence == "t" || tempSchema(rv.Schemaname))
}

// tempObject pins an object named in a temporary schema.
func tempObject(name []*pg_query.Node) string {
	if len(name) >= 2 && tempSchema(name[len(name)-2].GetString_().GetSval()) {
		return PinTempObject
	}
	return ""
}

// tempSchema reports pg_temp, the session's temporary schema, also by its
// number (pg_temp_3): another session's cannot be created in.
func tempSchema(s string) bool {
	s = strings.ToLower(s)
	return s == "pg_temp" || strings.HasPrefix(s, "pg_temp_")
}
