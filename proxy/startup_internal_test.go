package proxy

import (
	"encoding/binary"
	"reflect"
	"strings"
	"testing"
)

func TestSplitOptions(t *testing.T) {
	for in, want := range map[string][]string{
		"":                              nil,
		"-c a=b":                        {"-c", "a=b"},
		"  -c   a=b  -cx=y ":            {"-c", "a=b", "-cx=y"},
		`-c search_path=a\ b`:           {"-c", "search_path=a b"},
		`-c a=\\`:                       {"-c", `a=\`},
		"--statement-timeout=5\t-c x=1": {"--statement-timeout=5", "-c", "x=1"},
	} {
		if got := splitOptions(in); !reflect.DeepEqual(got, want) {
			t.Errorf("splitOptions(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckOptions(t *testing.T) {
	for in, ok := range map[string]bool{
		"-c search_path=public":            true,
		"-c statement_timeout=5s -c x.y=1": true,
		"--application-name=x":             true,
		"-c role=postgres":                 false,
		"-crole=postgres":                  false,
		"-c ROLE=postgres":                 false,
		"--role=postgres":                  false,
		"--session-authorization=x":        false,
		"-c session_authorization=x":       false,
		"-c jwt.claims.sub=u2":             false,
		`-c jwt.claims.sub\ =u2`:           false,
		"-c request.jwt.claims={}":         false,
		"-c Request.JWT.Claims={}":         false,
		"-B 10":                            false,
		"-D /tmp":                          false,
		"-c":                               false,
	} {
		if _, err := checkOptions(in, testPolicy); (err == nil) != ok {
			t.Errorf("checkOptions(%q) = %v, want ok=%v", in, err, ok)
		}
	}
}

// The client_encoding a client asks for at startup, in every spelling, is
// collected for the guard's check.
func TestStartupEncodings(t *testing.T) {
	for _, tc := range []struct {
		params []string
		want   string
	}{
		{[]string{"client_encoding", "SJIS"}, "SJIS"},
		{[]string{"options", "-c client_encoding=BIG5"}, "BIG5"},
		{[]string{"options", "-cclient_encoding=GBK"}, "GBK"},
		{[]string{"options", "--client-encoding=UHC"}, "UHC"},
		{[]string{"options", "-c CLIENT_ENCODING=johab"}, "johab"},
		{[]string{"client_encoding", "UTF8", "options", "-c client_encoding=gb18030"}, "UTF8,gb18030"},
		{[]string{"application_name", "client_encoding"}, ""},
	} {
		req, err := parseStartup(startupBody(append([]string{"user", "u"}, tc.params...)...), testPolicy)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(req.encodings, ","); got != tc.want {
			t.Errorf("%q: encodings %q, want %q", tc.params, got, tc.want)
		}
	}
}

func startupBody(params ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, protocol30)
	for _, p := range params {
		b = append(append(b, p...), 0)
	}
	return append(b, 0)
}

func TestParseStartup(t *testing.T) {
	req, err := parseStartup(startupBody("user", "alice", "application_name", "psql", "client_encoding", "UTF8", "_pq_.x", "1"), testPolicy)
	if err != nil {
		t.Fatal(err)
	}
	if req.user != "alice" || req.database != "alice" || req.applicationName != "psql" ||
		req.params["client_encoding"] != "UTF8" || len(req.unsupportedOptions) != 1 {
		t.Fatalf("%+v", req)
	}
	if _, ok := req.params["user"]; ok {
		t.Fatal("user is forwarded as a parameter")
	}
	for _, bad := range [][]string{
		{"user", "a", "role", "postgres"},
		{"user", "a", "session_authorization", "postgres"},
		{"user", "a", "jwt.claims.sub", "u2"},
		{"user", "a", "request.jwt.claims", "{}"},
		{"user", "a", "replication", "true"},
		{"user", "a", "options", "-c role=x"},
		{"database", "app"},
	} {
		if _, err := parseStartup(startupBody(bad...), testPolicy); err == nil {
			t.Errorf("startup %q accepted", bad)
		}
	}
	if _, err := parseStartup(append(binary.BigEndian.AppendUint32(nil, protocol30), "user\x00a"...), testPolicy); err == nil {
		t.Error("unterminated startup accepted")
	}
}

// FuzzParseStartup: arbitrary startup bodies never panic, and whatever is
// accepted never forwards an identity setting.
func FuzzParseStartup(f *testing.F) {
	f.Add(startupBody("user", "a", "options", "-c x=1"))
	f.Add(startupBody("user", "a", "role", "b"))
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) < 4 {
			return
		}
		req, err := parseStartup(body, testPolicy)
		if err != nil {
			return
		}
		for k := range req.params {
			if testPolicy.Protected(k) || k == "replication" {
				t.Fatalf("forwarded %q", k)
			}
		}
		if o, ok := req.params["options"]; ok {
			if _, err := checkOptions(o, testPolicy); err != nil {
				t.Fatal("forwarded options that checkOptions refuses")
			}
		}
	})
}
