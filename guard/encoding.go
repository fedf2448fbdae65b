package guard

import (
	"fmt"
	"strings"
)

// asciiSafeEncodings are the names PostgreSQL accepts for the encodings it
// also allows as server encodings (encnames.c, after clean_encoding_name:
// letters and digits, lower case). In all of them every byte below 0x80 is
// the ASCII character it looks like and every byte of a multibyte character
// is 0x80 or above, so a statement splits into tokens, literals and
// comments exactly as it does in UTF-8, which is how the guard reads it.
//
// Left out are the client-only encodings SJIS, SHIFT_JIS_2004, BIG5, GBK,
// UHC, GB18030 and JOHAB (and their aliases): a multibyte character there can
// end in 0x5c, which the guard would read as a backslash and the server, once
// it has converted the statement, does not, so a statement the guard takes
// for a string literal could run as SQL.
var asciiSafeEncodings = map[string]bool{
	"sqlascii": true, "utf8": true, "unicode": true, "muleinternal": true,
	"eucjp": true, "euccn": true, "euckr": true, "euctw": true, "eucjis2004": true,
	"latin1": true, "latin2": true, "latin3": true, "latin4": true, "latin5": true,
	"latin6": true, "latin7": true, "latin8": true, "latin9": true, "latin10": true,
	"iso88591": true, "iso88592": true, "iso88593": true, "iso88594": true, "iso88599": true,
	"iso885910": true, "iso885913": true, "iso885914": true, "iso885915": true, "iso885916": true,
	"iso88595": true, "iso88596": true, "iso88597": true, "iso88598": true,
	"koi8": true, "koi8r": true, "koi8u": true,
	"win": true, "alt": true, "abc": true, "tcvn": true, "tcvn5712": true, "vscii": true,
	"win866": true, "win874": true, "win1250": true, "win1251": true, "win1252": true, "win1253": true,
	"win1254": true, "win1255": true, "win1256": true, "win1257": true, "win1258": true,
	"windows866": true, "windows874": true, "windows1250": true, "windows1251": true, "windows1252": true,
	"windows1253": true, "windows1254": true, "windows1255": true, "windows1256": true, "windows1257": true,
	"windows1258": true,
}

// LexableEncoding reports whether the guard reads statements in client
// encoding name exactly as the server does (see asciiSafeEncodings).
func LexableEncoding(name string) error {
	var clean strings.Builder
	for _, c := range strings.ToLower(name) {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' {
			clean.WriteRune(c)
		}
	}
	if asciiSafeEncodings[clean.String()] {
		return nil
	}
	return fmt.Errorf("client_encoding %q is not supported through rlsproxy: in it a character's second byte can be 0x5c, which rlsproxy's guard would read as a backslash where the server does not, so the two would split a statement differently; use UTF8 or another encoding PostgreSQL allows for a database", name)
}
