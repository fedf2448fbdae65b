package guard

import (
	"bytes"
	"strings"
)

// A reading is one way the server may split a statement into tokens,
// literals and comments. The server lexes a statement after converting it
// from the session's client_encoding, with the session's
// standard_conforming_strings, and both are the client's to change, also by
// means the guard cannot see (a function the database offers) and pipelined
// ahead of the statement. So the guard does not trust its picture of either:
// it judges the statement under every reading the server could apply, and a
// statement passes only if every reading that parses gets the same verdict.
type reading struct {
	sql    string
	scsOff bool
	why    string // for the message when this reading is refused
}

// otherReadings returns the readings of a statement other than the one lex
// names: of text (the statement as the server's lexer sees it in an
// ASCII-safe encoding) with standard_conforming_strings flipped if it holds
// a backslash, and of raw (the bytes the client sent) in each client-only
// encoding whose multibyte characters would swallow an ASCII byte of it.
func otherReadings(raw, text string, lex Lexing) []reading {
	var out []reading
	scs := []bool{lex.NonStandardStrings}
	if strings.IndexByte(raw, '\\') >= 0 {
		scs = append(scs, !lex.NonStandardStrings)
		out = append(out, reading{text, !lex.NonStandardStrings, "with standard_conforming_strings " + onOff(lex.NonStandardStrings)})
	}
	sql := raw
	if !mayReadDifferently(sql) {
		return out
	}
	for _, enc := range clientOnlyEncodings {
		masked, differs := readAs(sql, enc.width)
		if !differs {
			continue
		}
		for _, off := range scs {
			why := "in client_encoding " + enc.name
			if off != lex.NonStandardStrings {
				why += " with standard_conforming_strings " + onOff(!off)
			}
			out = append(out, reading{masked, off, why})
		}
	}
	return out
}

// ParseCost is how many bytes the guard may parse to judge sql: its length
// times the readings it may need (see otherReadings). Up to
// MaxInProcessParse may be parsed in the proxy's own process.
func ParseCost(sql []byte) int {
	readings := 1
	scs := 1
	if bytes.IndexByte(sql, '\\') >= 0 {
		readings, scs = 2, 2
	}
	if mayReadDifferently(string(sql)) {
		readings += len(clientOnlyEncodings) * scs
	}
	return len(sql) * readings
}

// mayReadDifferently reports a high byte followed by a byte from 0x30 to
// 0x7e: only then can a client-only encoding read an ASCII character (a
// backslash, a digit) as part of a multibyte one.
func mayReadDifferently(sql string) bool {
	for i := 0; i+1 < len(sql); i++ {
		if sql[i] >= 0x80 && sql[i+1] >= 0x30 && sql[i+1] < 0x80 {
			return true
		}
	}
	return false
}

// clientOnlyEncodings are the encodings PostgreSQL accepts from clients only,
// by the character widths its wchar.c gives them (pg_*_verifychar). The
// server never lexes in them: it converts to the server encoding first, so
// a multibyte character becomes one non-ASCII character, whatever its bytes.
// JOHAB is left out: its verifier takes no ASCII byte into a character.
var clientOnlyEncodings = []struct {
	name  string
	width func(s string, i int) int // bytes of the character at i, or 0 if invalid
}{
	{"SJIS (and SHIFT_JIS_2004)", sjisWidth},
	{"BIG5, GBK or UHC", doubleByteWidth},
	{"GB18030", gb18030Width},
}

func sjisWidth(s string, i int) int {
	c := s[i]
	switch {
	case c < 0x80, c >= 0xa1 && c <= 0xdf: // ASCII, half-width kana
		return 1
	case (c >= 0x81 && c <= 0x9f || c >= 0xe0 && c <= 0xfc) && i+1 < len(s):
		if t := s[i+1]; t >= 0x40 && t <= 0x7e || t >= 0x80 && t <= 0xfc {
			return 2
		}
	}
	return 0
}

// doubleByteWidth covers BIG5, GBK and UHC: a lead byte from 0x81 and a
// second byte in the union of their ranges (the server's conversion refuses
// the rest).
func doubleByteWidth(s string, i int) int {
	c := s[i]
	switch {
	case c < 0x80:
		return 1
	case c >= 0x81 && c <= 0xfe && i+1 < len(s):
		if t := s[i+1]; t >= 0x40 && t <= 0x7e || t >= 0x80 && t <= 0xfe {
			return 2
		}
	}
	return 0
}

func gb18030Width(s string, i int) int {
	c := s[i]
	switch {
	case c < 0x80:
		return 1
	case c < 0x81 || c > 0xfe:
		return 0
	case i+3 < len(s) && s[i+1] >= 0x30 && s[i+1] <= 0x39:
		if s[i+2] >= 0x81 && s[i+2] <= 0xfe && s[i+3] >= 0x30 && s[i+3] <= 0x39 {
			return 4
		}
		return 0
	case i+1 < len(s):
		if t := s[i+1]; t >= 0x40 && t <= 0x7e || t >= 0x80 && t <= 0xfe {
			return 2
		}
	}
	return 0
}

// nonASCIIDollarTag reports a dollar-quote delimiter ($tag$) whose tag holds
// a byte from 0x80 up. The server matches a closing tag to the opening one
// after converting the statement to the database's encoding, where
// different characters of the client's can become one (and where the
// guard's readings, which stand every non-ASCII character for one, cannot
// tell them apart): only ASCII tags read alike everywhere.
func nonASCIIDollarTag(sql string) bool {
	for i := strings.IndexByte(sql, '$'); i >= 0 && i+1 < len(sql); {
		j := i + 1
		high := false
		for j < len(sql) && tagByte(sql[j], j == i+1) {
			high = high || sql[j] >= 0x80
			j++
		}
		if high && j < len(sql) && sql[j] == '$' {
			return true
		}
		next := strings.IndexByte(sql[j:], '$')
		if next < 0 {
			break
		}
		i = j + next
	}
	return false
}

// tagByte reports a byte a dollar-quote tag may hold (scan.l: dolq_start,
// dolq_cont).
func tagByte(c byte, first bool) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80 || !first && c >= '0' && c <= '9'
}

// maskHighBytes reads sql in an ASCII-safe encoding other than UTF-8:
// every byte from 0x80 up is (part of) one non-ASCII character.
func maskHighBytes(sql string) string {
	var b strings.Builder
	for i := 0; i < len(sql); i++ {
		if sql[i] < 0x80 {
			b.WriteByte(sql[i])
		} else {
			b.WriteString("é")
		}
	}
	return b.String()
}

// readAs returns sql as the server's lexer sees it in an encoding of the
// given widths: every non-ASCII character replaced by "é" (the lexer treats
// all non-ASCII characters alike), and whether that reading differs from
// UTF-8's, which it does only if a character takes in an ASCII byte. Bytes
// the encoding does not accept make the server refuse the statement: there
// is then no such reading.
func readAs(sql string, width func(string, int) int) (string, bool) {
	var b strings.Builder
	differs := false
	for i := 0; i < len(sql); {
		w := width(sql, i)
		if w == 0 {
			return "", false
		}
		if w == 1 && sql[i] < 0x80 {
			b.WriteByte(sql[i])
			i++
			continue
		}
		for _, c := range []byte(sql[i : i+w]) {
			differs = differs || c < 0x80
		}
		b.WriteString("é")
		i += w
	}
	return b.String(), differs
}
