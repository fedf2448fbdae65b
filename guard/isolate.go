package guard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/rlsproxy/rlsproxy/internal/sandbox"
	"github.com/rlsproxy/rlsproxy/session"
)

// Parsing a statement costs the guard far more than the statement, in
// memory per byte of SQL, and pg_query recurses once per level of an
// expression, so a long enough `SELECT 1+1+...` overflows a thread's stack
// and kills the process (README, "No statement takes the proxy down";
// figures in BENCHMARKS.md). The guard therefore parses in its own process
// only statements of up to MaxInProcessParse bytes, too short to nest deep
// enough; longer ones go to helper processes (internal/sandbox) with a
// memory limit and a time limit, where a crash or an exhausted limit costs a
// helper, not the proxy, and the statement is refused. Statements longer
// than ParseLimits.MaxStatement are refused without parsing.

// MaxInProcessParse is the longest statement text the guard parses in the
// proxy's own process.
const MaxInProcessParse = 4 << 10

// ParseLimits bound what parsing statements longer than MaxInProcessParse
// may cost.
type ParseLimits struct {
	// Helpers is the number of helper processes, and so of such statements
	// parsed at once (default 2).
	Helpers int
	// Memory bounds each helper's data (RLIMIT_DATA, default 1 GiB).
	Memory uint64
	// MaxStatement is the longest statement text parsed at all (default
	// 2 MiB): a longer one that needs parsing is refused (54000).
	MaxStatement int
	// Timeout bounds one parse, waiting for a free helper included
	// (default 15s).
	Timeout time.Duration
	// Logger hears of helpers that crash or time out (nil: discarded): the
	// client sees only that its statement was refused.
	Logger *slog.Logger
}

// guardSandbox names the helpers' handler; policyEnv carries the policy.
const (
	guardSandbox = "guard"
	policyEnv    = "RLSPROXY_GUARD_POLICY"
)

// In a helper process started by a guard, this answers its requests and
// never returns; in any other process it returns at once.
func init() {
	var once sync.Once
	var g *Guard
	sandbox.Serve(guardSandbox, func(req []byte) []byte {
		once.Do(func() {
			var c helperConfig
			_ = json.Unmarshal([]byte(os.Getenv(policyEnv)), &c)
			var opts []Option
			if c.AllowCode {
				opts = append(opts, AllowCode)
			}
			if c.TrackState {
				opts = append(opts, TrackState)
			}
			if c.NoRules {
				opts = append(opts, NoRules)
			}
			g = New(c.Policy, 0, opts...)
		})
		return answerParse(g, req)
	})
}

// helperConfig is the guard a helper judges as: its rules' inputs.
type helperConfig struct {
	Policy                         session.Policy
	AllowCode, TrackState, NoRules bool
}

// parseRequest is what the guard asks a helper: the verdict on one text.
type parseRequest struct {
	// SQL travels as bytes (base64 in JSON): a string would have its
	// non-UTF-8 bytes replaced, and the helper would judge another text.
	SQL      []byte
	Extended bool
	Lex      Lexing
}

func answerParse(g *Guard, req []byte) []byte {
	var r parseRequest
	v := Verdict{Reject: &Rejection{Rule: "guard_limit", Kind: TooCostly, Msg: "malformed request to the guard's parser"}}
	if json.Unmarshal(req, &r) == nil {
		v = g.decideHere(string(r.SQL), r.Extended, r.Lex)
	}
	out, _ := json.Marshal(v)
	return out
}

// IsolateParsing makes the guard parse statements longer than
// MaxInProcessParse in helper processes, within l. Close stops them.
func (g *Guard) IsolateParsing(l ParseLimits) error {
	if l.Helpers <= 0 {
		l.Helpers = 2
	}
	if l.Memory == 0 {
		l.Memory = 1 << 30
	}
	if l.MaxStatement <= 0 {
		l.MaxStatement = 2 << 20
	}
	if l.Timeout <= 0 {
		l.Timeout = 15 * time.Second
	}
	policy, err := json.Marshal(helperConfig{Policy: g.policy, AllowCode: g.allowCode, TrackState: g.trackState, NoRules: g.noRules})
	if err != nil {
		return err
	}
	g.limits = l
	g.helpers = sandbox.New(sandbox.Config{
		Name:        guardSandbox,
		Env:         []string{policyEnv + "=" + string(policy)},
		Workers:     l.Helpers,
		MemoryLimit: l.Memory,
		Timeout:     l.Timeout,
		MaxRequest:  l.MaxStatement*4/3 + 1024, // base64
		Logger:      l.Logger,
	})
	return nil
}

// Close stops the helper processes, if any.
func (g *Guard) Close() {
	if g.helpers != nil {
		_ = g.helpers.Close()
	}
}

// decide parses sql as the server reads it and applies the rules: here for
// short texts, in a helper for longer ones.
func (g *Guard) decide(sql string, extended bool, lex Lexing) Verdict {
	if g.helpers == nil || len(sql) <= MaxInProcessParse {
		return g.decideHere(sql, extended, lex)
	}
	if len(sql) > g.limits.MaxStatement {
		if g.noRules {
			return Verdict{Pin: PinUnparsed}
		}
		return Verdict{Reject: &Rejection{Rule: "guard_limit", Kind: TooCostly, Msg: fmt.Sprintf(
			"statement of %d bytes is longer than rlsproxy's guard checks (%d bytes) and holds words it must check: split it", len(sql), g.limits.MaxStatement)}}
	}
	req, _ := json.Marshal(parseRequest{SQL: []byte(sql), Extended: extended, Lex: lex})
	ctx, cancel := context.WithTimeout(context.Background(), g.limits.Timeout)
	defer cancel()
	resp, err := g.helpers.Do(ctx, req)
	var v Verdict
	if err == nil {
		err = json.Unmarshal(resp, &v)
	}
	if err != nil {
		if g.noRules {
			return Verdict{Pin: PinUnparsed}
		}
		return Verdict{Reject: &Rejection{Rule: "guard_limit", Kind: TooCostly, Msg: parseFailure(err, len(sql), g.limits)}}
	}
	return v
}

// parseFailure says why a statement could not be checked.
func parseFailure(err error, size int, l ParseLimits) string {
	var f *sandbox.Failure
	if errors.As(err, &f) {
		switch f.Kind {
		case sandbox.Crashed:
			return fmt.Sprintf("statement of %d bytes is too complex for rlsproxy's guard to check (its parser ran out of stack or of its %d MiB of memory): simplify or split it", size, l.Memory>>20)
		case sandbox.TimedOut:
			return fmt.Sprintf("statement of %d bytes took rlsproxy's guard longer than %s to check: simplify or split it", size, l.Timeout)
		case sandbox.Busy:
			return fmt.Sprintf("rlsproxy's guard had no parser free within %s for a statement of %d bytes: try again", l.Timeout, size)
		}
	}
	return "rlsproxy's guard could not check the statement: " + err.Error()
}
