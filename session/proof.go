package session

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Batch is one of the proxy's own round trips on an upstream connection:
// the frames it sends and the exact answers the server owes for them.
//
// A connection is only ever trusted with what it answers to the proxy's own
// statements when those answers prove to be their answers: the expected
// message types, in order, with no error, each ReadyForQuery carrying the
// expected transaction status, and the batch's last row carrying a nonce
// drawn for this batch alone. Answers left over from a client (a count gone
// wrong, a half-sent frame, a statement still running) come first and break
// the sequence; a client cannot forge the nonce. Whoever reads the answers
// (the pool's round trip, or the relay when it injects a batch mid-session)
// feeds them to Answer and closes the connection on any error.
type Batch struct {
	// Frames are the messages to send, ending with Sync or a Query.
	Frames []byte
	want   []answer
	next   int
	nonce  string
	// status is the transaction status every ReadyForQuery must report.
	status byte
}

// answer is one message the server owes a batch.
type answer struct {
	typ   byte
	check func(body []byte) error // nil: the type is enough
}

// newBatch starts a batch whose ReadyForQuery messages must all report
// status ('I' idle, 'T' in a transaction block).
func newBatch(status byte) *Batch {
	var n [16]byte
	_, _ = rand.Read(n[:])
	return &Batch{nonce: "rlsproxy_" + hex.EncodeToString(n[:]), status: status}
}

// query adds a simple Query answered by CommandComplete with tag and
// ReadyForQuery.
func (b *Batch) query(sql, tag string) {
	b.Frames, _ = (&pgproto3.Query{String: sql}).Encode(b.Frames)
	b.want = append(b.want, answer{'C', commandTag(tag)}, answer{'Z', b.readyStatus})
}

// exec adds an extended-protocol statement (text results): Parse, Bind,
// Execute, then Close of its statement and portal, answered by
// ParseComplete, BindComplete, one DataRow checked by row if row is set,
// CommandComplete and two CloseComplete.
//
// Nothing of the proxy's own statements may outlive the batch: the client
// takes the connection over right after it, and a statement left prepared
// (the unnamed one is the default target of a client's Bind) would run
// set_config('role', $1) with the client's parameters. So each runs as a
// statement and a portal named by the batch's nonce, closed in the batch.
func (b *Batch) exec(sql string, oids []uint32, formats []int16, params [][]byte, row func([][]byte) error) {
	name := b.nonce + "_" + strconv.Itoa(len(b.want))
	// Encoded one by one, not from a slice of FrontendMessage, so that the
	// messages stay on the stack: this runs on every identity switch.
	b.Frames, _ = (&pgproto3.Parse{Name: name, Query: sql, ParameterOIDs: oids}).Encode(b.Frames)
	b.Frames, _ = (&pgproto3.Bind{DestinationPortal: name, PreparedStatement: name, ParameterFormatCodes: formats, Parameters: params}).Encode(b.Frames)
	b.Frames, _ = (&pgproto3.Execute{Portal: name}).Encode(b.Frames)
	b.Frames, _ = (&pgproto3.Close{ObjectType: 'P', Name: name}).Encode(b.Frames)
	b.Frames, _ = (&pgproto3.Close{ObjectType: 'S', Name: name}).Encode(b.Frames)
	b.want = append(b.want, answer{typ: '1'}, answer{typ: '2'})
	if row != nil {
		b.want = append(b.want, answer{'D', func(body []byte) error {
			var d pgproto3.DataRow
			if err := d.Decode(body); err != nil {
				return err
			}
			return row(d.Values)
		}})
	}
	b.want = append(b.want, answer{typ: 'C'}, answer{typ: '3'}, answer{typ: '3'})
}

// closeUnnamed adds the Close of the unnamed statement and portal, each
// answered by CloseComplete (also when there was none).
func (b *Batch) closeUnnamed() {
	b.Frames, _ = (&pgproto3.Close{ObjectType: 'S'}).Encode(b.Frames)
	b.Frames, _ = (&pgproto3.Close{ObjectType: 'P'}).Encode(b.Frames)
	b.want = append(b.want, answer{typ: '3'}, answer{typ: '3'})
}

// sync closes the extended-protocol statements added so far: one transaction.
func (b *Batch) sync() {
	b.Frames, _ = (&pgproto3.Sync{}).Encode(b.Frames)
	b.want = append(b.want, answer{'Z', b.readyStatus})
}

// provedBy returns a row check: the row's columns are "t" then the nonce.
func (b *Batch) provedBy(what string) func([][]byte) error {
	return func(cols [][]byte) error {
		if len(cols) != 2 || string(cols[1]) != b.nonce {
			return fmt.Errorf("%s: the answer does not carry this round trip's nonce", what)
		}
		if string(cols[0]) != "t" {
			return fmt.Errorf("%s did not take effect", what)
		}
		return nil
	}
}

func (b *Batch) readyStatus(body []byte) error {
	if len(body) != 1 || body[0] != b.status {
		return fmt.Errorf("transaction status %q after the proxy's own statements, expected %q", body, b.status)
	}
	return nil
}

func commandTag(tag string) func([]byte) error {
	return func(body []byte) error {
		if string(cstring(body)) != tag {
			return fmt.Errorf("command tag %q, expected %q", cstring(body), tag)
		}
		return nil
	}
}

// ServerError is an error the server answered one of the proxy's own
// statements with.
type ServerError struct{ Code, Message string }

func (e *ServerError) Error() string {
	return fmt.Sprintf("the proxy's own statement failed: %s (SQLSTATE %s)", e.Message, e.Code)
}

// Async reports the messages the server may send at any time, which are not
// answers to a batch: NoticeResponse, ParameterStatus, NotificationResponse.
func Async(typ byte) bool { return typ == 'N' || typ == 'S' || typ == 'A' }

// Answer checks the server's next message for the batch (never an Async
// one). done reports the batch's last answer; an error, that the answers are
// not the batch's own: the connection must then be closed.
func (b *Batch) Answer(typ byte, body []byte) (done bool, err error) {
	if b.next >= len(b.want) {
		return true, fmt.Errorf("message %q after the proxy's own statements were answered", typ)
	}
	w := b.want[b.next]
	if typ != w.typ {
		if typ == 'E' {
			var e pgproto3.ErrorResponse
			if e.Decode(body) == nil {
				return false, &ServerError{Code: e.Code, Message: e.Message}
			}
		}
		return false, fmt.Errorf("message %q where %q was due: the answers are not the proxy's own", typ, w.typ)
	}
	if w.check != nil {
		if err := w.check(body); err != nil {
			return false, err
		}
	}
	b.next++
	return b.next == len(b.want), nil
}

// Units is the number of ReadyForQuery messages the batch is answered with.
func (b *Batch) Units() int {
	n := 0
	for _, w := range b.want {
		if w.typ == 'Z' {
			n++
		}
	}
	return n
}

// The statements that install a grant. Names, values and the role travel as
// bind parameters, never in the statement text, so pg_stat_activity and
// pg_stat_statements show only these constant texts. They travel as bytea,
// which the server does not convert from the client's encoding: the UTF-8
// of the token reaches the settings byte-exact whatever client_encoding the
// client chose (a text parameter under LATIN1 turns "Zoë" into "ZoÃ«").
//
// Every name in them is schema-qualified, operators included: they run on
// the session's search_path, whose "$user" schema (the login's, the mapped
// role's) or public a client may be able to create objects in, and a
// function there whose argument types match better (count(text) against
// pg_catalog.count("any")) would run inside every later session's install,
// where the claims and their signature are set.
const (
	installSettingsSQL = `SELECT pg_catalog.count(pg_catalog.set_config(pg_catalog.convert_from(n, 'UTF8'), pg_catalog.convert_from(v, 'UTF8'), false)) FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.bytea[]), pg_catalog.unnest($2::pg_catalog.bytea[])) AS s(n, v)`
	installRoleSQL     = `SELECT pg_catalog.set_config('role', pg_catalog.convert_from($1, 'UTF8'), false) IS NOT NULL AND current_user::pg_catalog.text OPERATOR(pg_catalog.=) pg_catalog.convert_from($1, 'UTF8'), $2::pg_catalog.text`
)

// switchResets undo, on a change of identity, the session state of the
// last one: all of DISCARD ALL but DEALLOCATE ALL, SET SESSION
// AUTHORIZATION (never reached) and DISCARD PLANS (no state), each a
// statement of its own in the batch's extended-protocol transaction. Then
// switchForgetSQL releases session advisory locks and draws a new seed.
var switchResets = []string{"CLOSE ALL", "UNLISTEN *", "RESET ALL", "DISCARD SEQUENCES", "DISCARD TEMP"}

const switchForgetSQL = `SELECT pg_catalog.pg_advisory_unlock_all(), pg_catalog.setseed($1)`

// reseedSQL draws a new seed for random() after a reset.
const reseedSQL = `SELECT pg_catalog.setseed($1)`

// randomSeed returns a seed for setseed, in [-1, 1], as text: from the
// proxy's own randomness, so that no client can know it.
func randomSeed() []byte {
	var n [8]byte
	_, _ = rand.Read(n[:])
	f := float64(binary.BigEndian.Uint64(n[:])>>11)/(1<<53)*2 - 1
	return strconv.AppendFloat(nil, f, 'g', -1, 64)
}

// installFrameBytes bounds the frames of an install batch but its two
// arrays: the statements' texts and the messages around them.
const installFrameBytes = 4096 + len(installSettingsSQL) + len(installRoleSQL)

// installBatch returns the batch that installs g on backend pid, in one
// transaction: back to the login role first (a client's RESET of one setting
// leaves the mapped role in place, which, hardened, may not call
// set_config), then the settings and the claims' signature, then the role,
// proved by the nonce. status is the transaction status the connection is in.
//
// prev is the grant installed on the connection before, if any and if it was
// not reset since: its settings that g lacks (a claim the new token does not
// carry) are emptied, as a reset would have, so that no claim of another
// identity is left for g's session to read. extra are settings of the
// client's own the connection must carry too (transaction pooling: the
// client's application_name, TimeZone, ...).
func installBatch(g, prev *Grant, extra []Setting, signer *Signer, pid uint32, status byte) *Batch {
	n := len(g.Settings) + len(extra) + 1
	if prev != nil {
		n += len(prev.Settings)
	}
	names, values := make([]string, 0, n), make([]string, 0, n)
	for _, s := range g.Settings {
		names, values = append(names, s.Name), append(values, s.Value)
	}
	for _, s := range extra {
		names, values = append(names, s.Name), append(values, s.Value)
	}
	signed := signer != nil && g.Claims != ""
	if signed {
		names, values = append(names, SignatureSetting), append(values, signer.Sign(pid, g.Claims))
	}
	if prev != nil {
		for _, s := range prev.Settings {
			if !slices.ContainsFunc(g.Settings, func(t Setting) bool { return strings.EqualFold(t.Name, s.Name) }) {
				names, values = append(names, s.Name), append(values, "")
			}
		}
		if !signed && prev.Claims != "" && signer != nil {
			names, values = append(names, SignatureSetting), append(values, "")
		}
	}
	nameArray, valueArray := encodeByteaArray(names), encodeByteaArray(values)
	b := newBatch(status)
	// Sized for the whole batch at once: growing it message by message was
	// most of the cost of building it.
	b.Frames = make([]byte, 0, installFrameBytes+len(nameArray)+len(valueArray))
	b.want = make([]answer, 0, 64)
	switched := prev != nil && !prev.SameIdentity(g)
	if switched {
		// The connection served another identity without a reset between.
		// The session-state rules (guard/state.go) see only a statement's
		// words, not the code it runs: a view, a domain's check, a column
		// default or a function can set a setting, take an advisory lock,
		// LISTEN, make a temporary object. So everything DISCARD ALL undoes
		// goes here too, whatever made it, but the prepared statements,
		// which the proxy follows by owner (DISCARD ALL cannot run inside
		// the batch's transaction). The client's carried settings come
		// back with the claims below (RESET ALL reset them).
		for _, sql := range switchResets {
			b.exec(sql, nil, nil, nil, nil)
		}
		b.closeUnnamed()
	}
	b.exec("RESET ROLE", nil, nil, nil, nil)
	if switched {
		// As the login role: the mapped role may be barred from calling
		// functions. The seed of random(), which not even DISCARD ALL
		// resets, is drawn again, so that no session chooses another's
		// random numbers (setseed).
		b.exec(switchForgetSQL, []uint32{float8OID}, nil, [][]byte{randomSeed()}, func(cols [][]byte) error {
			if len(cols) != 2 {
				return fmt.Errorf("%d columns from the release of advisory locks", len(cols))
			}
			return nil
		})
	}
	count := strconv.Itoa(len(names))
	b.exec(installSettingsSQL, byteaArrays, binaryFormats, [][]byte{nameArray, valueArray},
		func(cols [][]byte) error {
			if len(cols) != 1 || string(cols[0]) != count {
				return fmt.Errorf("%s of %s claim settings were installed", cols, count)
			}
			return nil
		})
	b.exec(installRoleSQL, []uint32{byteaOID, textOID}, []int16{1, 0}, [][]byte{[]byte(g.Role), []byte(b.nonce)},
		b.provedBy(fmt.Sprintf("the switch to role %q", g.Role)))
	b.sync()
	return b
}

// plantedSQL shows that the login role carries no setting of its own, in this
// database or any (ALTER ROLE ... SET): the logins rlsproxy sql creates have
// none, so one found was planted, by a session that reached its login.
// (pg_settings would not show a planted claim: custom settings are not in
// it until set.)
const plantedSQL = `SELECT NOT EXISTS (SELECT FROM pg_catalog.pg_db_role_setting s
	WHERE s.setrole OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) session_user)
	AND (s.setdatabase OPERATOR(pg_catalog.=) 0::pg_catalog.oid
	  OR s.setdatabase OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()))), $1::pg_catalog.text`

// plantedCheck returns b with the proof that the login carries no setting of
// its own put ahead of its statements, in the same transaction.
func plantedCheck(b *Batch) *Batch {
	// Its own nonce, and so its own statement name.
	c := &Batch{nonce: b.nonce + "p", status: b.status}
	c.exec(plantedSQL, []uint32{textOID}, nil, [][]byte{[]byte(c.nonce)}, func(cols [][]byte) error {
		if len(cols) == 2 && string(cols[1]) == c.nonce && string(cols[0]) == "f" {
			return ErrPlantedSettings
		}
		return c.provedBy("the check for planted settings")(cols)
	})
	c.Frames = append(c.Frames, b.Frames...)
	c.want = append(c.want, b.want...)
	return c
}

// resetProofSQL shows that a reset connection carries nothing of the last
// session's identity: it runs as the login role with no claims and no
// signature, and holds no prepared statement (but the batch's own, named
// by its nonce) or LISTEN. (Advisory locks go
// with DISCARD ALL too; the pool tests check them, but pg_locks is too dear
// to read on every release.)
const resetProofSQL = `SELECT current_user OPERATOR(pg_catalog.=) session_user
	AND coalesce(pg_catalog.current_setting($1, true), '') OPERATOR(pg_catalog.=) ''
	AND coalesce(pg_catalog.current_setting('` + SignatureSetting + `', true), '') OPERATOR(pg_catalog.=) ''
	AND NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p
	  WHERE pg_catalog.left(p.name, pg_catalog.length($2)) OPERATOR(pg_catalog.<>) $2)
	AND NOT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), $2::pg_catalog.text`

// resetBatch returns the batch that undoes a session on a connection in
// transaction status status: ROLLBACK when a transaction is open, DISCARD
// ALL (role, settings, prepared statements, temporary tables, advisory
// locks, LISTEN), a new seed for random() (which DISCARD ALL keeps), and
// the proof, which checks claimsSetting too.
func resetBatch(status byte, claimsSetting string) *Batch {
	b := newBatch('I')
	if status != 'I' {
		b.query("ROLLBACK", "ROLLBACK")
	}
	b.query("DISCARD ALL", "DISCARD ALL")
	b.exec(reseedSQL, []uint32{float8OID}, nil, [][]byte{randomSeed()}, func(cols [][]byte) error {
		if len(cols) != 1 {
			return fmt.Errorf("%d columns from setseed", len(cols))
		}
		return nil
	})
	b.exec(resetProofSQL, []uint32{textOID, textOID}, nil, [][]byte{[]byte(claimsSetting), []byte(b.nonce)},
		b.provedBy("the reset"))
	b.sync()
	return b
}

const (
	byteaOID      = 17
	textOID       = 25
	float8OID     = 701
	byteaArrayOID = 1001
)

var (
	byteaArrays   = []uint32{byteaArrayOID, byteaArrayOID}
	binaryFormats = []int16{1, 1}
)

// encodeByteaArray writes a one-dimensional bytea[] in PostgreSQL's binary
// array format: ndim, has-null flag, element type, then length and lower
// bound of the dimension, then each element as length and bytes.
func encodeByteaArray(elems []string) []byte {
	size := 20
	for _, e := range elems {
		size += 4 + len(e)
	}
	b := make([]byte, 0, size)
	if len(elems) == 0 {
		b = binary.BigEndian.AppendUint32(b, 0) // no dimensions
		b = binary.BigEndian.AppendUint32(b, 0)
		return binary.BigEndian.AppendUint32(b, byteaOID)
	}
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint32(b, byteaOID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(elems)))
	b = binary.BigEndian.AppendUint32(b, 1)
	for _, e := range elems {
		b = binary.BigEndian.AppendUint32(b, uint32(len(e)))
		b = append(b, e...)
	}
	return b
}

// cstring returns b up to its first NUL.
func cstring(b []byte) []byte {
	for i, c := range b {
		if c == 0 {
			return b[:i]
		}
	}
	return b
}
