package proxy

import (
	"bytes"
	"encoding/binary"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/sqlquote"
	"github.com/rlsproxy/rlsproxy/session"
)

// statements are one transaction-pooled client's prepared statements
// (protocol-level: Parse with a name), which must follow the client from
// backend to backend: consecutive transactions may run on different
// connections, and a statement prepared on one is unknown on the next.
//
// Each statement gets a name of its own on the server, unique to the client
// session (prefix, then a number), so that clients sharing a connection
// never see each other's; a name the client never prepared is renamed into
// its own namespace too, so that no client can reach another's statement by
// guessing its server name. The client's Parse is kept, renamed, and sent
// again ahead of a Bind or Describe on a connection that does not hold the
// statement (Upstream.Prepared). Close and DEALLOCATE are renamed likewise.
// The unnamed statement keeps its name (every Parse replaces it); the
// connection records whose it is (Upstream.UnnamedOwner).
type statements struct {
	owner  uint64 // the client session's number
	prefix string // "rlsproxy_<owner>_"
	byName map[string]*statement
	seq    int
	bytes  int // of the Parse frames kept
}

type statement struct {
	server string // its name on the server
	parse  []byte // the client's Parse, renamed
	// dropsAll: the statement is a DEALLOCATE ALL, which drops every
	// statement on the connection it is executed on.
	dropsAll bool
}

// The most a client may keep prepared; past it the client is pinned to its
// connection, where its statements stay as they are, and the proxy keeps
// their names only, up to maxNames (a Parse of one more is refused, 54000).
const (
	maxStatements     = 2000
	maxStatementBytes = 8 << 20
	maxNames          = 10 * maxStatements
)

// nameBytes is as much of a statement name as PostgreSQL reads: it keys
// prepared statements by their first NAMEDATALEN-1 bytes, so that two names
// alike that far are one statement, there and here.
const nameBytes = 63

// key is the part of a client's statement name that names it.
func key(name string) string {
	if len(name) > nameBytes {
		return name[:nameBytes]
	}
	return name
}

// statementPrefix begins every statement name the proxy gives on the server.
const statementPrefix = "rlsproxy_"

func newStatements(owner uint64) *statements {
	return &statements{owner: owner, prefix: statementPrefix + strconv.FormatUint(owner, 10) + "_", byName: map[string]*statement{}}
}

// full reports whether the client keeps as much as it may.
func (s *statements) full() bool {
	return len(s.byName) >= maxStatements || s.bytes >= maxStatementBytes
}

// tooMany reports whether a Parse of name would keep one name more than a
// client may. It takes the frame's bytes: a lookup of string(b) does not
// copy them, and this runs on every Parse.
func (s *statements) tooMany(name []byte) bool {
	return len(name) > 0 && len(s.byName) >= maxNames && s.byName[string(name[:min(len(name), nameBytes)])] == nil
}

// size is what the proxy keeps for a statement: its Parse, if kept, and
// its names.
func (st *statement) size(name string) int {
	return len(st.parse) + len(name) + len(st.server)
}

// serverName returns the name on the server of the client's statement name:
// its own, or, for a name it never prepared, one in its namespace that no
// statement has.
func (s *statements) serverName(name string) string {
	if name == "" {
		return ""
	}
	name = key(name)
	if st := s.byName[name]; st != nil {
		return st.server
	}
	// Cut at 63 bytes, a name may end inside a character, and PostgreSQL
	// refuses a message whose string is not valid in the client's
	// encoding (22021): without the bytes of the cut character, the name
	// is refused as PostgreSQL refuses the client's own, for naming no
	// statement.
	return s.prefix + "unknown_" + trimCutRune(name)
}

// trimCutRune drops from s the bytes of a UTF-8 character cut at its end.
func trimCutRune(s string) string {
	for i := 0; i < utf8.UTFMax-1 && len(s) > 0; i++ {
		if r, size := utf8.DecodeLastRuneInString(s); r != utf8.RuneError || size != 1 {
			break
		}
		s = s[:len(s)-1]
	}
	return s
}

// parse takes a client's Parse frame (whole, already passed by the guard)
// and returns the frame to send: renamed, and kept to send again on other
// connections.
//
// Each Parse of a name gets a server name never used before, even one of a
// name the client holds already. A client parses a name again only when it
// believes it holds no such statement: its last Parse of the name failed
// (an error in the statement, a transaction already aborted, or skipped
// after an earlier error before Sync), though the connection it went to was
// marked as holding it, and its text kept. Under the old server name, the
// next connection would be sent that failed text again, and the one marked
// would be sent a Bind of a statement it does not have (26000). The
// PostgreSQL error for a name prepared twice (42P05) is lost: the second
// text wins, and the first, should it exist, stays on its connection until
// its session's statements are dropped.
//
// dropsAll tells a DEALLOCATE ALL: it drops the connection's statements when
// it runs, at an Execute after a Bind of it (bound). keepText is false once
// the client is pinned: its statements never need to go to another
// connection, and a client past the limits must not make the proxy keep
// more (its name is kept, to rename its Bind, Describe and Close).
func (s *statements) parse(up *session.Upstream, frame []byte, dropsAll, keepText bool) []byte {
	name, rest, ok := cut(frame[5:])
	if !ok {
		return frame // malformed: the server refuses it
	}
	if len(name) == 0 {
		up.SetUnnamedOwner(s.owner)
		var text []byte
		if keepText {
			text = bytes.Clone(frame) // frame is the client's buffer
		}
		s.keep("", "", text, dropsAll)
		return frame
	}
	s.seq++
	server := s.prefix + strconv.Itoa(s.seq)
	renamed := rebuild(frame[0], []byte(server), rest)
	text := renamed
	if !keepText {
		text = nil
	}
	s.keep(key(string(name)), server, text, dropsAll)
	up.SetPrepared(s.owner, server, true)
	return renamed
}

// keep records the statement name, whose Parse frame it takes.
func (s *statements) keep(name, server string, frame []byte, dropsAll bool) {
	if old := s.byName[name]; old != nil {
		s.bytes -= old.size(name)
	}
	st := &statement{server: server, parse: frame, dropsAll: dropsAll}
	s.byName[name] = st
	s.bytes += st.size(name)
}

// use returns, for a client message naming statement name (Bind, Describe
// of a statement), the frames to send ahead of it on up when up does not
// hold the statement (nil if it does, or if the client never prepared it),
// and the name on the server. Ahead of a named statement's Parse goes its
// Close: should the statement exist there after all (the proxy forgot it
// too early), the Parse would fail.
func (s *statements) use(up *session.Upstream, name string) (pre []byte, server string) {
	name = key(name)
	st := s.byName[name]
	if name == "" {
		switch {
		case up.UnnamedOwner() == s.owner:
			return nil, ""
		case st == nil:
			// The client prepared none: whatever unnamed statement the
			// connection holds (another session's of the same identity,
			// which no install closed) is not for it to run.
			up.SetUnnamedOwner(0)
			return rebuild('C', []byte{'S'}, nil), ""
		}
		if st.parse == nil {
			return nil, "" // not kept (pinned): the server answers as it would
		}
		up.SetUnnamedOwner(s.owner)
		return st.parse, ""
	}
	if st == nil {
		return nil, s.serverName(name)
	}
	if up.Prepared(s.owner, st.server) || st.parse == nil {
		return nil, st.server
	}
	up.SetPrepared(s.owner, st.server, true)
	pre = rebuild('C', append([]byte{'S'}, st.server...), nil)
	return append(pre, st.parse...), st.server
}

// forget forgets the client's statement name and returns its name on the
// server.
func (s *statements) forget(name string) string {
	name = key(name)
	server := s.serverName(name)
	if st := s.byName[name]; st != nil {
		s.bytes -= st.size(name)
		delete(s.byName, name)
	}
	return server
}

// close forgets the client's statement name (Close, DEALLOCATE) and up's
// record of it, and returns its name on the server, with the record to
// give the ledger, for it to be undone should the server not run the
// message (nil when up was not recorded as holding it).
func (s *statements) close(up *session.Upstream, name string) (server string, recs []stmtRecord) {
	name = key(name)
	st := s.byName[name]
	server = s.forget(name)
	held := server != "" && up.Prepared(s.owner, server)
	if held {
		up.SetPrepared(s.owner, server, false)
	}
	if held || st != nil {
		recs = []stmtRecord{{name: server, kept: held, client: name, stmt: st}}
	}
	return server, recs
}

// forgetAll is the record of a DEALLOCATE ALL for the ledger.
func forgetAll() []stmtRecord { return []stmtRecord{{all: true}} }

// undo puts back the records of statements whose Parse, Close or
// DEALLOCATE the server failed or discarded (the ledger's takeUndone): a
// statement whose Parse did not run is not held, and a later use prepares
// it again; one whose Close did not run is still held, counted, and closed
// once its session has ended (relay.sweep). After a DEALLOCATE ALL that did
// not run, what up holds is unknown: it is reset before its next client.
func (s *statements) undo(up *session.Upstream, recs []stmtRecord) {
	for _, r := range recs {
		switch {
		case r.all:
			up.MarkPreparedUnknown()
		case !r.kept:
		case r.name != "":
			up.SetPrepared(s.owner, r.name, r.held)
		case !r.held && up.UnnamedOwner() == s.owner:
			up.SetUnnamedOwner(0)
		}
		if r.stmt != nil && s.byName[r.client] == nil {
			// The client's name comes back too, unless it has parsed the
			// name again since.
			s.byName[r.client] = r.stmt
			s.bytes += r.stmt.size(r.client)
		}
	}
}

// closeAll forgets every statement of the client (DEALLOCATE ALL, DISCARD
// ALL): on up they are gone, with every other client's.
func (s *statements) closeAll(up *session.Upstream) {
	s.byName, s.bytes = map[string]*statement{}, 0
	up.ForgetPrepared()
}

// renameRef rewrites a whole Bind, Describe or Close frame naming a
// statement: it returns the renamed frame, and the frames the connection
// needs first, if any (see use). recs are what the frame drops from up's
// record of statements (a Close, the Bind of a DEALLOCATE ALL), for the
// ledger.
func (s *statements) renameRef(up *session.Upstream, frame []byte) (pre, renamed []byte, recs []stmtRecord) {
	typ, body := frame[0], frame[5:]
	switch typ {
	case 'B':
		portal, rest, ok := cut(body)
		if !ok {
			return nil, frame, nil
		}
		name, rest, ok := cut(rest)
		if !ok {
			return nil, frame, nil
		}
		pre, server := s.use(up, string(name))
		if st := s.byName[key(string(name))]; st != nil && st.dropsAll {
			// Executing it drops every statement of the connection; the
			// portal may also never run (no Execute, one skipped after an
			// error, the portal closed), so what the connection holds is
			// unknown: it is reset before its next client.
			s.closeAll(up)
			up.MarkPreparedUnknown()
		}
		if server == string(name) {
			return pre, frame, recs // the unnamed statement keeps its name
		}
		n := len(portal) + 1 + len(server) + 1 + len(rest)
		b := make([]byte, 5, 5+n)
		b[0] = 'B'
		binary.BigEndian.PutUint32(b[1:], uint32(4+n))
		b = append(append(b, portal...), 0)
		b = append(append(b, server...), 0)
		return pre, append(b, rest...), recs
	case 'D', 'C':
		if len(body) < 2 || body[0] != 'S' {
			return nil, frame, nil // a portal: portals end with their transaction
		}
		name, rest, ok := cut(body[1:])
		if !ok {
			return nil, frame, nil
		}
		if typ == 'C' {
			server, recs := s.close(up, string(name))
			return nil, rebuild('C', append([]byte{'S'}, server...), rest), recs
		}
		pre, server := s.use(up, string(name))
		return pre, rebuild('D', append([]byte{'S'}, server...), rest), nil
	}
	return nil, frame, nil
}

// deallocate returns the Query that deallocates the client's statement
// names on the server, and the frames the connection needs first (so that
// the server's answer is the one the client expects), or a nil query when
// the names are to be sent as the client wrote them; recs are what it drops
// from up's record, for the ledger. later: the DEALLOCATE is being
// prepared, to run when it is executed, if ever: up's record stays (a
// record of a statement gone costs a Close of nothing, which is no error). names are a verdict's
// (several for a Query of several DEALLOCATE statements), each deallocated
// in turn. A name the client never prepared goes under its own name (a
// statement of SQL PREPARE, on a connection the client is pinned to),
// unless it is in the proxy's namespace: another client's statement on the
// same connection, which it must not reach, so it is renamed into the
// client's own, where no statement has it.
func (s *statements) deallocate(up *session.Upstream, names []string, later bool) (pre, query []byte, recs []stmtRecord) {
	var sql strings.Builder
	rewrite := false
	for _, name := range names {
		server := name
		name = key(name)
		switch {
		case name != "" && s.byName[name] != nil:
			pre = append(pre, s.placeholder(up, name, later)...)
			if later {
				server = s.forget(name)
			} else {
				var r []stmtRecord
				server, r = s.close(up, name)
				recs = append(recs, r...)
			}
			rewrite = true
		case strings.HasPrefix(name, statementPrefix):
			server = s.serverName(name)
			rewrite = true
		}
		if sql.Len() > 0 {
			sql.WriteString("; ")
		}
		sql.WriteString("DEALLOCATE " + sqlquote.Ident(server))
	}
	if !rewrite {
		return nil, nil, nil
	}
	query, _ = (&pgproto3.Query{String: sql.String()}).Encode(nil)
	return pre, query, recs
}

// placeholder returns the frames that give up, ahead of a DEALLOCATE of the
// client's statement name, a statement of its server name if up lacks one
// (it was prepared on another connection): a trivial one, not the
// client's, whose text could fail to prepare here (a table dropped since),
// leaving the DEALLOCATE to fail, or, skipped with it up to a Sync that a
// simple-query client never sends, unanswered. later: the DEALLOCATE is
// being prepared (extended protocol), and runs when executed; else it is a
// Query, and so is the placeholder's SQL PREPARE, whose answers the client
// does not see (it fails only where the DEALLOCATE does: in a failed
// transaction block).
func (s *statements) placeholder(up *session.Upstream, name string, later bool) []byte {
	server := s.byName[name].server
	if up.Prepared(s.owner, server) {
		return nil
	}
	if later {
		up.SetPrepared(s.owner, server, true)
		b, _ := (&pgproto3.Parse{Name: server, Query: "SELECT"}).Encode(nil)
		return b
	}
	b, _ := (&pgproto3.Query{String: "PREPARE " + sqlquote.Ident(server) + " AS SELECT"}).Encode(nil)
	return b
}

// rebuild returns a frame of type typ whose body is name, a NUL, then rest
// (or body alone when name is nil).
func rebuild(typ byte, name, rest []byte) []byte {
	n := len(rest)
	if name != nil {
		n += len(name) + 1
	}
	out := make([]byte, 5, 5+n)
	out[0] = typ
	binary.BigEndian.PutUint32(out[1:], uint32(4+n))
	if name != nil {
		out = append(append(out, name...), 0)
	}
	return append(out, rest...)
}

// cut splits b at its first NUL.
func cut(b []byte) (before, after []byte, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return nil, nil, false
	}
	return b[:i], b[i+1:], true
}
