package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/devissuer"
)

// claimFlags collects repeated --claim name=value flags.
type claimFlags map[string]any

func (c claimFlags) String() string { return "" }

func (c claimFlags) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("--claim %q is not name=value", s)
	}
	var js any
	if json.Unmarshal([]byte(v), &js) == nil {
		c[k] = js // numbers, booleans, arrays and objects as JSON
	} else {
		c[k] = v
	}
	return nil
}

func cmdToken(args []string) error {
	fs := flag.NewFlagSet("rlsproxy token", flag.ContinueOnError)
	sub := fs.String("sub", "", "subject (`user id`) of the token")
	groups := fs.String("groups", "", "comma `list` of cognito:groups")
	ttl := fs.Duration("ttl", time.Hour, "lifetime of the token")
	var use string
	enumVar(fs, &use, "token-use", "access", []string{"access", "id"}, "access or id")
	devDir := fs.String("dev-dir", defaultDevDir(), "`directory` of rlsproxy dev's key")
	extra := claimFlags{}
	fs.Var(extra, "claim", "extra claim `name=value` (JSON values allowed); repeatable")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	key, err := devissuer.LoadKey(filepath.Join(*devDir, "dev-key.pem"))
	if err != nil {
		if os.IsNotExist(err) {
			return fmt.Errorf("no dev key in %s: run `rlsproxy dev` first", *devDir)
		}
		return err
	}
	raw, err := os.ReadFile(filepath.Join(*devDir, "issuer.json"))
	if err != nil {
		return fmt.Errorf("no dev issuer in %s: run `rlsproxy dev` first", *devDir)
	}
	var st devState
	if err := json.Unmarshal(raw, &st); err != nil {
		return err
	}
	issuer, err := devissuer.New(st.Issuer, key)
	if err != nil {
		return err
	}
	tok, err := issuer.Mint(devissuer.TokenRequest{Subject: *sub, Groups: splitList(*groups), TTL: *ttl, TokenUse: use, Extra: extra})
	if err != nil {
		return err
	}
	fmt.Println(tok)
	return nil
}
