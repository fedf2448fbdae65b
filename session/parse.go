package session

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

#define RLSPROXY_SCS_OFF 32 // PG_QUERY_DISABLE_STANDARD_CONFORMING_STRINGS
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
