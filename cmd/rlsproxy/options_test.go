package main

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// clearEnv keeps RLSPROXY_* variables of the machine running the tests out
// of them.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "RLSPROXY_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

func newFlagSet(register ...func(*flag.FlagSet)) *flag.FlagSet {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, r := range register {
		r(fs)
	}
	return fs
}

// A bad value of an enum flag fails while the flags are parsed, naming the
// choices, whether it came from the command line or from RLSPROXY_*.
func TestEnumFlags(t *testing.T) {
	for _, tc := range []struct {
		flag, good, want string
	}{
		{"guard", "off", "must be on or off"},
		{"on-token-expiry", "ignore", "must be terminate or ignore"},
		{"token-use", "id", "must be access, id or any"},
		{"log-format", "json", "must be text or json"},
		{"log-level", "debug", "must be debug, info, warn or error"},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			clearEnv(t)
			var o serveOptions
			err := parseFlags(newFlagSet(o.register), []string{"--" + tc.flag, "nonsense"})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "-"+tc.flag) {
				t.Fatalf("from the command line: %v", err)
			}

			env := envName(tc.flag)
			t.Setenv(env, "nonsense")
			err = parseFlags(newFlagSet(o.register), nil)
			if err == nil || !strings.Contains(err.Error(), env) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `"nonsense"`) {
				t.Fatalf("from %s: %v", env, err)
			}
			// The command line wins, so the bad variable is never read.
			if err := parseFlags(newFlagSet(o.register), []string{"--" + tc.flag, tc.good}); err != nil {
				t.Fatalf("a good value on the command line over a bad %s: %v", env, err)
			}

			t.Setenv(env, tc.good)
			o = serveOptions{}
			fs := newFlagSet(o.register)
			if err := parseFlags(fs, nil); err != nil || fs.Lookup(tc.flag).Value.String() != tc.good {
				t.Fatalf("%s=%s: %v, got %q", env, tc.good, err, fs.Lookup(tc.flag).Value.String())
			}
		})
	}
}

// rlsproxy token's --token-use is an enum of what the dev issuer mints.
func TestTokenUseFlag(t *testing.T) {
	clearEnv(t)
	err := run([]string{"token", "--sub", "x", "--token-use", "any", "--dev-dir", t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "must be access or id") {
		t.Fatal(err)
	}
}

// Defaults of the enums are their documented ones, and -h shows them.
func TestEnumDefaults(t *testing.T) {
	clearEnv(t)
	var o serveOptions
	fs := newFlagSet(o.register)
	if err := parseFlags(fs, nil); err != nil {
		t.Fatal(err)
	}
	if o.guard != "on" || o.onTokenExpiry != "terminate" || o.tokenUse != "access" || o.logFormat != "text" || o.logLevel != "info" {
		t.Fatalf("%+v", o)
	}
	var help strings.Builder
	fs.SetOutput(&help)
	fs.PrintDefaults()
	if !strings.Contains(help.String(), "(default terminate)") {
		t.Fatalf("-h:\n%s", &help)
	}
}

// Each subcommand registers the flags it uses and no others.
func TestSubcommandFlags(t *testing.T) {
	policy := []string{"role", "role-claim", "role-map", "anonymous-role", "claims-setting", "claim-prefix"}
	issuer := []string{"cognito-region", "cognito-user-pool-id", "issuer", "jwks-url", "jwks-refresh", "client-id", "audience"}
	names := func(fs *flag.FlagSet) []string {
		var out []string
		fs.VisitAll(func(f *flag.Flag) { out = append(out, f.Name) })
		return out
	}
	same := func(t *testing.T, what string, got, want []string) {
		t.Helper()
		slices.Sort(got)
		want = slices.Sorted(slices.Values(want))
		if !slices.Equal(got, want) {
			t.Errorf("%s registers %v, want %v", what, got, want)
		}
	}

	var sql sqlOptions
	same(t, "sql", names(newFlagSet(sql.register)),
		append([]string{"upstream", "signing-key-file", "leeway", "harden", "transition"}, policy...))
	var check checkOptions
	same(t, "check", names(newFlagSet(check.register)), append([]string{"upstream", "signing-key-file"}, policy...))

	var serve serveOptions
	all := names(newFlagSet(serve.register))
	for _, f := range append(append([]string{"upstream", "listen", "guard", "pool-size", "admin-listen", "log-level"}, policy...), issuer...) {
		if !slices.Contains(all, f) {
			t.Errorf("serve lacks --%s", f)
		}
	}
	var dev devOptions
	got := names(newFlagSet(serve.registerProxy, dev.registerDev))
	want := slices.DeleteFunc(slices.Clone(all), func(f string) bool { return slices.Contains(issuer, f) || f == "config" })
	same(t, "dev", got, append(want, "dev-dir", "issuer-listen", "ttl"))
}

// The subcommands refuse flags they would have ignored before.
func TestSubcommandsRefuseOtherFlags(t *testing.T) {
	clearEnv(t)
	for _, args := range [][]string{
		{"sql", "--listen", "127.0.0.1:1"},
		{"sql", "--guard", "off"},
		{"check", "--leeway", "1m"},
		{"check", "--harden"},
		{"dev", "--issuer", "https://issuer.example.com/"},
		{"dev", "--client-id", "x"},
		{"health", "--upstream", "postgres://x"},
	} {
		err := run(args)
		if err == nil || !strings.Contains(err.Error(), "flag provided but not defined") {
			t.Errorf("%v: %v", args, err)
		}
	}
	// What is left after the flags used to be ignored; it would hide a flag
	// behind it (flag parsing stops at the first non-flag).
	if err := run([]string{"sql", "--harden", "stray", "--role", "x"}); err == nil || !strings.Contains(err.Error(), "takes no arguments") {
		t.Errorf("a stray argument: %v", err)
	}
}

// The commands of the README's Security section parse and check.
func TestREADMECommands(t *testing.T) {
	clearEnv(t)
	key := filepath.Join(t.TempDir(), "signing.key")
	if err := os.WriteFile(key, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	upstream := "postgres://authenticator:secret@127.0.0.1:5432/app"

	out, err := captureStdout(t, func() error {
		return run([]string{"sql", "--upstream", upstream, "--role-map", "admins=app_admin", "--signing-key-file", key, "--harden"})
	})
	if err != nil || !strings.Contains(out, `"app_admin"`) || !strings.Contains(out, "REVOKE") {
		t.Fatalf("rlsproxy sql: %v\n%s", err, out)
	}

	var o checkOptions
	if err := parseFlags(newFlagSet(o.register), []string{"--upstream", upstream, "--role-map", "admins=app_admin", "--signing-key-file", key}); err != nil {
		t.Fatalf("rlsproxy check: %v", err)
	}
	opts, err := o.config()
	if err != nil || opts.Login != "authenticator" || opts.Signer == nil || opts.Connect == nil || len(opts.Policy.RoleMap) != 1 {
		t.Fatalf("rlsproxy check: %v %+v", err, opts)
	}
}

func TestOneOf(t *testing.T) {
	for choices, want := range map[string]string{"a": "a", "a b": "a or b", "a b c": "a, b or c"} {
		if got := oneOf(strings.Fields(choices)); got != want {
			t.Errorf("%q: %q", choices, got)
		}
	}
}
