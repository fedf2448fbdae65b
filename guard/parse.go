package guard

/*
#include <stdlib.h>

// The declarations of pg_query.h (libpg_query 17, linked by
// github.com/pganalyze/pg_query_go/v6) this file needs: pg_query_go's Go API
// parses with standard_conforming_strings on only, and the guard must also
// read statements as a session with it off does.
typedef struct {
	char* message;
	char* funcname;
	char* filename;
	int lineno;
	int cursorpos;
	char* context;
} PgQueryError;

typedef struct {
	size_t len;
	char* data;
} PgQueryProtobuf;

typedef struct {
	PgQueryProtobuf parse_tree;
	char* stderr_buffer;
	PgQueryError* error;
} PgQueryProtobufParseResult;

PgQueryProtobufParseResult pg_query_parse_protobuf_opts(const char* input, int parser_options);
void pg_query_free_protobuf_parse_result(PgQueryProtobufParseResult result);

typedef struct {
	PgQueryProtobuf pbuf;
	char* stderr_buffer;
	PgQueryError* error;
} PgQueryScanResult;

PgQueryScanResult pg_query_scan(const char* input);
void pg_query_free_scan_result(PgQueryScanResult result);

// The scanner reads this (thread-local, like every setting of libpg_query)
// when it starts; pg_query_scan has no option for it.
extern __thread _Bool standard_conforming_strings;

#define RLSPROXY_SCS_OFF 32 // PG_QUERY_DISABLE_STANDARD_CONFORMING_STRINGS

// rlsproxy_lexes reports whether input splits into tokens with
// standard_conforming_strings as given: every literal, comment and quoted
// identifier closed, every escape valid.
static int rlsproxy_lexes(const char* input, int scs_off) {
	standard_conforming_strings = !scs_off;
	PgQueryScanResult r = pg_query_scan(input);
	standard_conforming_strings = 1;
	int ok = r.error == NULL;
	pg_query_free_scan_result(r);
	return ok;
}
*/
import "C"

import (
	"errors"
	"unsafe"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
)

// parseTree parses sql with PostgreSQL's grammar, as the server lexes it
// with standard_conforming_strings on, or off when scsOff is set.
func parseTree(sql string, scsOff bool) (*pg_query.ParseResult, error) {
	if !scsOff {
		return pg_query.Parse(sql)
	}
	in := C.CString(sql)
	defer C.free(unsafe.Pointer(in))
	res := C.pg_query_parse_protobuf_opts(in, C.RLSPROXY_SCS_OFF)
	defer C.pg_query_free_protobuf_parse_result(res)
	if res.error != nil {
		return nil, errors.New(C.GoString(res.error.message))
	}
	tree := &pg_query.ParseResult{}
	buf := C.GoBytes(unsafe.Pointer(res.parse_tree.data), C.int(res.parse_tree.len))
	if err := proto.Unmarshal(buf, tree); err != nil {
		return nil, err
	}
	return tree, nil
}

// lexes reports whether the server's lexer accepts sql, read with
// standard_conforming_strings off when scsOff is set: a reading that does
// not lex is one the server refuses, whatever its grammar.
func lexes(sql string, scsOff bool) bool {
	in := C.CString(sql)
	defer C.free(unsafe.Pointer(in))
	off := C.int(0)
	if scsOff {
		off = 1
	}
	return C.rlsproxy_lexes(in, off) != 0
}
