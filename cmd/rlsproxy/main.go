// Command rlsproxy is a PostgreSQL wire-protocol proxy that takes an identity
// token (AWS Cognito or any OIDC issuer) as the password and opens a session
// whose role and settings carry that identity, so Row-Level Security applies
// to any SQL client.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `rlsproxy: a PostgreSQL proxy that turns an identity token into an RLS session

Usage:
  rlsproxy [serve] [flags]   run the proxy (rlsproxy serve -h lists the flags)
  rlsproxy dev [flags]       run a demo: throwaway Postgres, local issuer, proxy, ready psql lines
  rlsproxy token --sub S     mint a token with the dev issuer's key
  rlsproxy sql [--upstream DSN] [role flags] [--signing-key-file F] [--leeway D] [--harden] [--transition]
                             print the bootstrap SQL: roles, auth schema, signing key, hardening
  rlsproxy check --upstream DSN [role flags] [--signing-key-file F]
                             report what in the database weakens RLS; exit 1 on a problem
  rlsproxy health [--ready]  exit 0 if the running proxy's /healthz (or /readyz) answers 200
  rlsproxy version           print version and build information

Each command takes only the flags it uses (rlsproxy <command> -h lists them); the role
flags are --role, --role-claim, --role-map, --anonymous-role, --claims-setting and
--claim-prefix. Every flag can also be set as RLSPROXY_<FLAG>, e.g. RLSPROXY_UPSTREAM; the
command line wins.
`

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, errFindings) {
			os.Exit(1) // the report is printed already
		}
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "rlsproxy:", err)
		}
		os.Exit(2)
	}
}

func run(args []string) error {
	cmd := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve":
		return cmdServe(args)
	case "dev":
		return cmdDev(args)
	case "token":
		return cmdToken(args)
	case "sql":
		return cmdSQL(args)
	case "check":
		return cmdCheck(args)
	case "health":
		return cmdHealth(args)
	case "version":
		fmt.Println(versionString())
		return nil
	case "help":
		fmt.Print(usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

func versionString() string {
	s := fmt.Sprintf("rlsproxy %s %s %s/%s", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, kv := range bi.Settings {
			switch kv.Key {
			case "vcs.revision", "vcs.time", "vcs.modified", "CGO_ENABLED":
				s += fmt.Sprintf(" %s=%s", kv.Key, kv.Value)
			}
		}
	}
	return s
}
