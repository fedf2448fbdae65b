package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/guard"
)

// guardLimits are the figures of what the guard spends on statements it
// must parse (session/guard_isolate.go).
type guardLimits struct {
	LargestParsed    int     `json:"largest_parsed_bytes"`
	Sessions         int     `json:"sessions"`
	StatementBytes   int     `json:"statement_bytes"`
	PeakRSS          int64   `json:"peak_rss_bytes"`         // proxy and its helpers, sampled
	PeakProxyRSS     int64   `json:"peak_proxy_rss_bytes"`   // the proxy alone
	BaseRSS          int64   `json:"base_rss_bytes"`         // before
	Seconds          float64 `json:"seconds"`                // until the last answer
	Outcomes         string  `json:"outcomes"`               // how the statements ended
	Added1KBMicros   float64 `json:"added_1kb_us"`           // guard on vs off, median per statement
	Added1KBOnMicros float64 `json:"latency_1kb_on_us"`      // median, guard on
	Added1KBOffMicro float64 `json:"latency_1kb_off_us"`     // median, guard off
	OtherWorstMillis float64 `json:"other_session_worst_ms"` // another session's slowest query meanwhile
}

// measureGuardLimits runs a proxy of its own (so its peak memory is this
// measurement's) and sends the largest statement the guard parses from
// several sessions at once, in its worst shape for memory (`SELECT
// 1,1,...`, about 240 bytes of parse tree per byte), while another session
// runs small queries; then times 1 KB statements the guard must parse,
// against a proxy with the guard off.
func (b *bench) measureGuardLimits(bin, upstream, issuer, token string) error {
	fmt.Fprintln(os.Stderr, "guard limits...")
	ctx := context.Background()
	port, pid, stop, err := startProxy(bin, upstream, issuer, "--guard", "on")
	if err != nil {
		return err
	}
	defer stop()
	offPort, _, stopOff, err := startProxy(bin, upstream, issuer, "--guard", "off")
	if err != nil {
		return err
	}
	defer stopOff()
	dsn := func(port int) string {
		return fmt.Sprintf("host=127.0.0.1 port=%d user=bench password=%s dbname=bench sslmode=disable", port, token)
	}
	gl := guardLimits{LargestParsed: 2 << 20, Sessions: 8}
	// Just under the limit: the guard parses it (its word "set" makes it).
	stmt := "SELECT 1" + strings.Repeat(",1", (gl.LargestParsed-32)/2) + " -- set"
	gl.StatementBytes = len(stmt)

	other, err := pgconn.Connect(ctx, dsn(port))
	if err != nil {
		return err
	}
	defer other.Close(ctx)
	conns := make([]*pgconn.PgConn, gl.Sessions)
	for i := range conns {
		if conns[i], err = pgconn.Connect(ctx, dsn(port)); err != nil {
			return err
		}
		defer conns[i].Close(ctx)
	}
	gl.BaseRSS, _ = treeRSS(pid)

	var peak, peakProxy int64
	sampling := make(chan struct{})
	var sampled sync.WaitGroup
	sampled.Add(1)
	go func() {
		defer sampled.Done()
		for {
			if n, err := treeRSS(pid); err == nil {
				peak = max(peak, n)
			}
			if n, err := rss(pid); err == nil {
				peakProxy = max(peakProxy, n)
			}
			select {
			case <-sampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	outcomes := make([]string, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c.Exec(ctx, stmt).ReadAll()
			switch e := err.(type) {
			case nil:
				outcomes[i] = "parsed and ran"
			case *pgconn.PgError:
				outcomes[i] = "refused " + e.Code
			default:
				outcomes[i] = "failed: " + err.Error()
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	var worst time.Duration
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
			t0 := time.Now()
			if _, err := other.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
				return err
			}
			worst = max(worst, time.Since(t0))
		}
	}
	gl.Seconds = time.Since(start).Seconds()
	close(sampling)
	sampled.Wait()
	gl.PeakRSS, gl.PeakProxyRSS, gl.OtherWorstMillis = peak, peakProxy, float64(worst.Microseconds())/1000
	counts := map[string]int{}
	for _, o := range outcomes {
		counts[o]++
	}
	var parts []string
	for o, n := range counts {
		parts = append(parts, fmt.Sprintf("%d %s", n, o))
	}
	sort.Strings(parts)
	gl.Outcomes = strings.Join(parts, ", ")

	// 1 KB statements the guard must parse, each a new text (no cache).
	latency := func(port int) (float64, error) {
		c, err := pgconn.Connect(ctx, dsn(port))
		if err != nil {
			return 0, err
		}
		defer c.Close(ctx)
		var ds []float64
		for i := range 2000 {
			// "set" makes the guard parse it; the number, a new text.
			q := fmt.Sprintf("SELECT %d, 'set %s'", i, strings.Repeat("x", 1000))
			t0 := time.Now()
			if _, err := c.Exec(ctx, q).ReadAll(); err != nil {
				return 0, err
			}
			ds = append(ds, float64(time.Since(t0).Microseconds()))
		}
		return median(ds), nil
	}
	on, err := latency(port)
	if err != nil {
		return err
	}
	off, err := latency(offPort)
	if err != nil {
		return err
	}
	gl.Added1KBOnMicros, gl.Added1KBOffMicro, gl.Added1KBMicros = on, off, on-off
	b.guardLimits = &gl
	fmt.Printf("guard limits: largest statement parsed %d bytes; %d sessions sending a %d-byte `SELECT 1,1,...` at once: %s in %.1fs; "+
		"peak RSS %.0f MiB (proxy alone %.0f MiB, %.0f MiB before); another session's slowest query meanwhile %.1f ms; "+
		"a 1 KB statement the guard parses: %.0f µs with the guard, %.0f µs without (+%.0f µs)\n\n",
		gl.LargestParsed, gl.Sessions, gl.StatementBytes, gl.Outcomes, gl.Seconds, float64(gl.PeakRSS)/(1<<20),
		float64(gl.PeakProxyRSS)/(1<<20), float64(gl.BaseRSS)/(1<<20), gl.OtherWorstMillis, on, off, on-off)
	_ = guard.MaxInProcessParse // the limit the 1 KB statement stays under
	return nil
}

// treeRSS is the resident memory of a process and its children (the
// guard's helper processes).
func treeRSS(pid int) (int64, error) {
	total, err := rss(pid)
	if err != nil {
		return 0, err
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		data, _ := os.ReadFile(t)
		for _, f := range strings.Fields(string(data)) {
			child, _ := strconv.Atoi(f)
			if n, err := rss(child); err == nil {
				total += n
			}
		}
	}
	return total, nil
}
