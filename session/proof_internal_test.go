package session

import (
	"strconv"
	"strings"
	"testing"
)

// benchGrant is a grant shaped like a Cognito ID token's under the default
// policy: the claims JSON and a setting per claim.
func benchGrant(user string) *Grant {
	claims := `{"sub":"` + user + `","email":"` + user + `@example.com","iat":1764280000,"exp":1764283600,"aud":"client","iss":"https://cognito-idp.us-east-1.amazonaws.com/pool","token_use":"id","cognito:groups":["app"]}`
	g := &Grant{Role: "app_user", Claims: claims, Settings: []Setting{{"request.jwt.claims", claims}}}
	for _, k := range []string{"aud", "email", "exp", "iat", "iss", "sub", "token_use"} {
		g.Settings = append(g.Settings, Setting{"jwt.claims." + k, user + "-" + k})
	}
	return g
}

// BenchmarkInstallBatch measures building the install of a grant on a
// connection that served another identity, as transaction pooling does on
// every switch (many-users in bench/).
func BenchmarkInstallBatch(b *testing.B) {
	signer, err := NewSigner([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		b.Fatal(err)
	}
	grants := make([]*Grant, 16)
	for i := range grants {
		grants[i] = benchGrant("user-" + strconv.Itoa(i))
	}
	extra := []Setting{{"application_name", "bench"}}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		installBatch(grants[i%16], grants[(i+1)%16], extra, signer, 4242, 'I')
	}
}

// TestInstallBatchSized checks that installFrameBytes holds a switch's
// frames with room to spare, so that building one never grows its buffer.
func TestInstallBatchSized(t *testing.T) {
	signer, err := NewSigner([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	long := &Grant{Role: strings.Repeat("r", 63), Claims: "{}", Settings: []Setting{{"request.jwt.claims", "{}"}}}
	for _, tc := range []struct {
		name      string
		g, prev   *Grant
		wantSpare int
	}{
		{"switch", benchGrant("a"), benchGrant("b"), 256},
		{"first", benchGrant("a"), nil, 256},
		{"longest role name", long, benchGrant("b"), 128},
	} {
		b := installBatch(tc.g, tc.prev, []Setting{{"application_name", "x"}}, signer, 1, 'I')
		if spare := cap(b.Frames) - len(b.Frames); spare < tc.wantSpare {
			t.Errorf("%s: %d bytes of frames, %d spare, want %d", tc.name, len(b.Frames), spare, tc.wantSpare)
		}
	}
}
