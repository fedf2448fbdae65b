package main

// The transaction pooling workloads (make bench-tx):
//
//   - tx-1000: pgbench -S -M simple with 1,000 clients over 20 upstream
//     connections: rlsproxy --pool-mode transaction against PgBouncer in
//     transaction mode and PostgreSQL directly (1,000 backends).
//   - many-users: a Go load of its own, one user (token) per client and a
//     think time between transactions, so that connections change identity
//     (installs) between transactions; against the same load with one user.
//   - connect-before: pgbench -S -C against the proxy of this tree and the
//     one of -before-rev, before session pooling released connections
//     without DISCARD ALL.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/devissuer"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

// txOptions tune the transaction pooling workloads.
type txOptions struct {
	duration            time.Duration
	clients, upstream   int
	muClients, muUsers  int
	muThink             time.Duration
	beforeBin           string
	beforeRev           string
	profileDir          string
	builtBefore, source string // what "rlsproxy before" and the others ran
}

// The transaction pooling targets, measured only by the workloads naming
// them.
const (
	bouncerTx   = "pgbouncer tx"
	proxyTx     = "rlsproxy tx"
	proxyBefore = "rlsproxy before"
	oneUser     = "rlsproxy tx, 1 user"
)

// manyUsersTarget is the many-users load's target with a user per client.
func (b *bench) manyUsersTarget() string { return fmt.Sprintf("rlsproxy tx, %d users", b.tx.muUsers) }

// txWorkloads are the transaction pooling workloads; connect is the
// arguments of the connect workload's pgbench runs.
func (b *bench) txWorkloads(common []string) []workload {
	secs := strconv.Itoa(int(b.tx.duration.Seconds()))
	return []workload{
		{name: "tx-1000", desc: fmt.Sprintf("pgbench -S -M simple -c %d, %d upstream connections", b.tx.clients, b.tx.upstream), metric: "tps",
			args:    []string{"-S", "-n", "-M", "simple", "-c", strconv.Itoa(b.tx.clients), "-j", "2", "-T", secs},
			targets: []string{"direct", bouncerTx, proxyTx}, tolerant: true},
		{name: "many-users", desc: fmt.Sprintf("%d clients, %d ms think time, one user per client vs one user, %d upstream connections",
			b.tx.muClients, b.tx.muThink.Milliseconds(), b.tx.upstream), metric: "tps", custom: b.manyUsers,
			targets: []string{"direct", bouncerTx, b.manyUsersTarget(), oneUser}},
		{name: "connect-before", desc: "pgbench -S -C (connect per transaction), rlsproxy now and before", metric: "tps",
			args:    append([]string{"-S", "-C"}, common...),
			targets: []string{"direct", "pgbouncer", "rlsproxy guard on", proxyBefore, proxyTx}, tolerant: true},
	}
}

// isTxWorkload reports whether workload w belongs in the Markdown's
// "Transaction pooling" section.
func isTxWorkload(w string) bool {
	return slices.Contains([]string{"tx-1000", "many-users", "connect-before"}, w)
}

// maxConnections is the cluster's max_connections: room for the idle
// measurement's or tx-1000's clients, plus the pools'.
func (b *bench) maxConnections() int { return max(b.idleClients, b.tx.clients) + 200 }

// raiseFileLimit raises the soft limit on open files for this process and
// what it starts (pgbench, PgBouncer, the proxies) to at least n, if the
// hard limit allows.
func raiseFileLimit(n int) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	want := min(max(uint64(n), lim.Cur), lim.Max)
	if want > lim.Cur {
		lim.Cur = want
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			fmt.Fprintf(os.Stderr, "raising the open files limit to %d: %v\n", want, err)
		}
	}
}

// startTxTargets starts the targets the selected transaction pooling
// workloads need: PgBouncer in transaction mode, rlsproxy in transaction
// mode (with /metrics), and the rlsproxy of -before-rev.
func (b *bench) startTxTargets(bin, upstream string, issuer *devissuer.Issuer, token string) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for _, s := range slices.Backward(stops) {
			s()
		}
	}
	defer func() {
		if err != nil {
			stop()
		}
	}()
	needs := func(ws ...string) bool {
		return slices.ContainsFunc(ws, func(w string) bool { return slices.Contains(b.only, w) })
	}
	if b.proxyRev == "" {
		b.tx.source = "the working tree at `" + gitDescribe() + "`"
	} else {
		b.tx.source = "commit `" + b.proxyRev + "` (`-proxy-rev`)"
	}
	if needs("tx-1000", "many-users") {
		port, pid, s, err := b.startPgBouncerMode("transaction", b.tx.upstream)
		if err != nil {
			return stop, err
		}
		stops = append(stops, s)
		b.targets = append(b.targets, target{name: bouncerTx, port: port, password: b.loginPassword, pid: pid, optIn: true})
	}
	if needs("tx-1000", "many-users", "connect-before") {
		admin, err := pgtemp.FreePort()
		if err != nil {
			return stop, err
		}
		n := strconv.Itoa(b.tx.upstream)
		// --pprof: its goroutines are dumped if a run hangs or fails
		// (dumpProxy); idle otherwise.
		args := []string{"--pool-mode", "transaction", "--max-upstream-conns", n, "--pool-size", n, "--pool-wait", "60s",
			"--admin-listen", fmt.Sprintf("127.0.0.1:%d", admin), "--pprof"}
		port, pid, s, err := startProxy(bin, upstream, issuer.URL, args...)
		if err != nil {
			return stop, err
		}
		stops = append(stops, s)
		tx := target{name: proxyTx, port: port, password: token, pid: pid, optIn: true, adminPort: admin, subjects: []string{"bench"}}
		b.targets = append(b.targets, tx)
		// The many-users load's two shapes, through the same proxy.
		one := tx
		one.name, one.tokens = oneUser, []string{token}
		many := tx
		many.name, many.subjects = b.manyUsersTarget(), nil
		for i := range b.tx.muUsers {
			sub := fmt.Sprintf("user-%04d", i)
			tok, err := issuer.Mint(devissuer.TokenRequest{Subject: sub, TTL: 24 * time.Hour})
			if err != nil {
				return stop, err
			}
			many.tokens, many.subjects = append(many.tokens, tok), append(many.subjects, sub)
		}
		b.targets = append(b.targets, many, one)
	}
	if needs("connect-before") {
		before := b.tx.beforeBin
		if before == "" {
			if before, err = b.buildBefore(); err != nil {
				return stop, err
			}
		}
		b.tx.builtBefore = before
		if b.tx.beforeBin == "" {
			b.tx.builtBefore = b.tx.beforeRev
		}
		port, pid, s, err := startProxy(before, upstream, issuer.URL)
		if err != nil {
			return stop, err
		}
		stops = append(stops, s)
		b.targets = append(b.targets, target{name: proxyBefore, port: port, password: token, pid: pid, optIn: true})
	}
	return stop, nil
}

// buildBefore builds the proxy of -before-rev.
func (b *bench) buildBefore() (string, error) { return buildAt(b.dir, b.tx.beforeRev, "before") }

// buildAt builds the proxy of commit rev into dir, from `git archive` (the
// repository's worktrees are left alone), as the harness builds its own.
func buildAt(dir, rev, name string) (string, error) {
	src := filepath.Join(dir, name+"-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "building rlsproxy of %s...\n", rev)
	archive := exec.Command("git", "archive", "--format=tar", rev)
	untar := exec.Command("tar", "-x", "-C", src)
	pipe, err := archive.StdoutPipe()
	if err != nil {
		return "", err
	}
	untar.Stdin = pipe
	var archiveErr strings.Builder
	archive.Stderr = &archiveErr
	if err := untar.Start(); err != nil {
		return "", err
	}
	if err := archive.Run(); err != nil {
		_ = untar.Wait()
		return "", fmt.Errorf("git archive %s: %v %s", rev, err, archiveErr.String())
	}
	if err := untar.Wait(); err != nil {
		return "", fmt.Errorf("untar %s: %v", rev, err)
	}
	bin := filepath.Join(dir, "rlsproxy-"+name)
	build := exec.Command("go", "build", "-o", bin, "./cmd/rlsproxy")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build of %s: %v\n%s", rev, err, out)
	}
	return bin, nil
}

// gitDescribe names the tree the proxy was built from.
func gitDescribe() string {
	out, err := exec.Command("git", "describe", "--tags", "--always", "--dirty").Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}

// manyUsers runs the many-users load against t: b.tx.muClients clients,
// each a connection of its own logged in with t.tokens[i % len] (its user),
// running a one-statement transaction (pgbench -S's SELECT, and the subject
// the proxy installed), then thinking b.tx.muThink, for b.tx.duration after
// a warm-up of 2 s. It returns tps, and in extras the transactions (tx), the
// latency percentiles (p50_ms, p99_ms, max_ms), the failed transactions
// (errors) and those that ran as another user (wrong_user).
func (b *bench) manyUsers(t target) (float64, extras, error) {
	ctx := context.Background()
	tokens := t.tokens
	if tokens == nil {
		tokens = []string{t.password}
	}
	conns := make([]*pgconn.PgConn, b.tx.muClients)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(ctx)
			}
		}
	}()
	// Log in, 16 at a time.
	began := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	errs := make([]error, len(conns))
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=authenticator password=%s dbname=bench sslmode=disable", t.port, tokens[i%len(tokens)])
			cctx, cancel := context.WithTimeout(ctx, queryTimeout)
			defer cancel()
			conns[i], errs[i] = pgconn.Connect(cctx, dsn)
		}()
	}
	wg.Wait()
	connectSecs := time.Since(began).Seconds()
	// A client that could not log in is counted (login_errors), and the
	// load runs with the others.
	loginErrors := 0
	for i, err := range errs {
		if err != nil {
			if loginErrors == 0 {
				fmt.Fprintf(os.Stderr, "%s many-users against %s: client %d could not log in: %v\n", time.Now().Format(time.TimeOnly), t.name, i, err)
			}
			loginErrors++
		}
	}
	if loginErrors == len(conns) {
		return 0, nil, fmt.Errorf("many-users: no client could log in: %w", errors.Join(errs...))
	}

	const warmup = 2 * time.Second
	start := time.Now()
	from, until := start.Add(warmup), start.Add(warmup+b.tx.duration)
	accounts := 100000 * b.scale
	lat := make([][]time.Duration, len(conns))
	var failed, wrongUser atomic.Int64
	var firstErr atomic.Value
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(start.UnixNano())))
			var want string
			if t.subjects != nil {
				want = t.subjects[i%len(t.subjects)]
			}
			// Stagger the clients' first transactions over a think time.
			time.Sleep(time.Duration(rng.Int64N(int64(b.tx.muThink) + 1)))
			for {
				sent := time.Now()
				if !sent.Before(until) {
					return
				}
				sql := fmt.Sprintf("SELECT abalance, current_setting('jwt.claims.sub', true) FROM pgbench_accounts WHERE aid = %d", rng.IntN(accounts)+1)
				qctx, cancel := context.WithTimeout(ctx, queryTimeout)
				res, err := c.Exec(qctx, sql).ReadAll()
				cancel()
				took := time.Since(sent)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("client %d: %v", i, err))
					return // a connection after a failure may be gone: this client stops
				}
				if want != "" && (len(res) != 1 || len(res[0].Rows) != 1 || string(res[0].Rows[0][1]) != want) {
					wrongUser.Add(1)
				}
				if !sent.Before(from) {
					lat[i] = append(lat[i], took)
				}
				time.Sleep(b.tx.muThink)
			}
		}()
	}
	wg.Wait()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[min(len(all)-1, int(p*float64(len(all))))].Microseconds()) / 1000
	}
	slow := len(all) - sort.Search(len(all), func(i int) bool { return all[i] > 100*time.Millisecond })
	x := extras{"tx": float64(len(all)), "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": pct(1), "over_100ms": float64(slow),
		"errors": float64(failed.Load()), "wrong_user": float64(wrongUser.Load()), "login_s": connectSecs, "login_errors": float64(loginErrors)}
	if e := firstErr.Load(); e != nil {
		fmt.Fprintf(os.Stderr, "many-users against %s: %d transactions failed, the first: %s\n", t.name, failed.Load(), e)
	}
	if n := wrongUser.Load(); n > 0 {
		fmt.Fprintf(os.Stderr, "many-users against %s: %d transactions ran as another user\n", t.name, n)
	}
	tps := float64(len(all)) / b.tx.duration.Seconds()
	fmt.Fprintf(os.Stderr, "  %s %s: %.0f tps, p50 %.2f ms, p99 %.2f ms (logins from %s)\n", time.Now().Format(time.TimeOnly), t.name, tps, x["p50_ms"], x["p99_ms"], began.Format(time.TimeOnly))
	return tps, x, nil
}

// queryTimeout bounds a many-users transaction: one still unanswered after
// it counts as failed (hung), and its client stops.
const queryTimeout = time.Minute

// scrapeMetrics reads the proxy's /metrics on port as series -> value;
// port 0: nil.
func scrapeMetrics(port int) (map[string]float64, error) {
	if port == 0 {
		return nil, nil
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m, sc.Err()
}

// proxyCounters adds to x what the proxy counted between two scrapes:
// connections handed to transaction-pooled clients that needed the
// client's identity installed (installs) or had it already
// (same_identity), their share (install_share), the mean wait for a
// connection (pool_wait_ms), logins (the sessions set up: each takes a
// connection with its identity installed), upstream connections open at the
// end (upstream_open), sessions ended for want of a connection
// (pool_exhausted), pinned sessions (pinned) and statements prepared again
// (reprepared).
func proxyCounters(x extras, before, after map[string]float64) extras {
	if x == nil {
		x = extras{}
	}
	d := func(series string) float64 { return after[series] - before[series] }
	sum := func(prefix string) float64 {
		var s float64
		for k, v := range after {
			if strings.HasPrefix(k, prefix) {
				s += v - before[k]
			}
		}
		return s
	}
	checkouts := "rlsproxy_transaction_connections_total" // as of c58c0bd
	if _, ok := after[`rlsproxy_pool_checkouts_total{identity="install"}`]; ok {
		checkouts = "rlsproxy_pool_checkouts_total" // its successor, which counts logins too
	}
	x["installs"] = d(checkouts + `{identity="install"}`)
	x["same_identity"] = d(checkouts + `{identity="same_identity"}`)
	if _, ok := after[`rlsproxy_pool_releases_total{kind="reset"}`]; ok {
		x["releases_reset"] = d(`rlsproxy_pool_releases_total{kind="reset"}`)
		x["releases_kept"] = d(`rlsproxy_pool_releases_total{kind="without_reset"}`)
	}
	if n := x["installs"] + x["same_identity"]; n > 0 {
		x["install_share"] = x["installs"] / n
	}
	if n := d("rlsproxy_pool_wait_seconds_count"); n > 0 {
		x["pool_wait_ms"] = 1000 * d("rlsproxy_pool_wait_seconds_sum") / n
	}
	x["logins"] = d("rlsproxy_upstream_connect_seconds_count")
	x["upstream_open"] = after["rlsproxy_upstream_connections"]
	x["pool_exhausted"] = d(`rlsproxy_sessions_ended_total{reason="pool_exhausted"}`)
	x["pinned"] = sum("rlsproxy_pinned_sessions_total")
	x["reprepared"] = d("rlsproxy_statements_reprepared_total")
	return x
}

// pgbenchTimeout is how long a tolerant workload's pgbench may run before
// it is taken for hung: its -T, three times over, and two minutes for its
// logins.
func pgbenchTimeout(args []string) time.Duration {
	if d := pgbenchDuration(args); d > 0 {
		return 3*d + 2*time.Minute
	}
	return 0
}

// pgbenchDuration is pgbench's -T; 0 without.
func pgbenchDuration(args []string) time.Duration {
	if i := slices.Index(args, "-T"); i >= 0 && i+1 < len(args) {
		if secs, err := strconv.Atoi(args[i+1]); err == nil {
			return time.Duration(secs) * time.Second
		}
	}
	return 0
}

// profile saves a CPU profile of t's proxy over the first round of a
// transaction pooling workload, with -cpu-profile-dir; the function
// returned waits for it.
func (b *bench) profile(w workload, t target, round int) (wait func()) {
	if b.tx.profileDir == "" || t.adminPort == 0 || round != 0 || (w.name != "tx-1000" && w.name != "many-users") {
		return func() {}
	}
	secs := max(5, int(b.tx.duration.Seconds())-10)
	file := filepath.Join(b.tx.profileDir, w.name+"-"+strings.NewReplacer(" ", "-", ",", "").Replace(t.name)+".pprof")
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(5 * time.Second) // past the logins
		c := http.Client{Timeout: time.Duration(secs+30) * time.Second}
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", t.adminPort, secs))
		if err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		defer resp.Body.Close()
		if err := os.MkdirAll(b.tx.profileDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		f, err := os.Create(file)
		if err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		defer f.Close()
		if _, err := io.Copy(f, resp.Body); err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		fmt.Fprintf(os.Stderr, "profile of %s during %s: %s (%d s)\n", t.name, w.name, file, secs)
	}()
	return func() { <-done }
}

// pgCPU is the CPU time (user+system) PostgreSQL has spent so far: the
// postmaster's, its children's that ended, and those of the live ones.
func (b *bench) pgCPU() (time.Duration, error) {
	if !slices.ContainsFunc(b.only, isTxWorkload) {
		return 0, errors.New("not measured") // reading /proc takes a while: only for the workloads that show it
	}
	data, err := os.ReadFile(filepath.Join(b.pg.Dir, "data", "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	pm, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(data), "\n", 2)[0]))
	if err != nil {
		return 0, err
	}
	f, err := procStat(pm)
	if err != nil {
		return 0, err
	}
	total := ticks(f[11]) + ticks(f[12]) + ticks(f[13]) + ticks(f[14])
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if c, err := procStat(pid); err == nil && c[1] == strconv.Itoa(pm) {
			total += ticks(c[11]) + ticks(c[12])
		}
	}
	return total, nil
}

// procStat is /proc/<pid>/stat's fields after the command name: [0] is the
// state, [1] the parent, [11] and [12] utime and stime, [13] and [14] those
// of the children waited for.
func procStat(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	if len(f) < 15 {
		return nil, errors.New("short /proc stat")
	}
	return f, nil
}

func ticks(s string) time.Duration {
	n, _ := strconv.ParseInt(s, 10, 64)
	return time.Duration(n) * time.Second / 100 // USER_HZ
}

// selfCPU is the CPU time this process has spent.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuSampler samples a middleman's CPU time every 250 ms and PostgreSQL's
// every second, while pgbench runs: the rates of its steady state, past
// the logins, which a whole run's CPU time would include.
type cpuSampler struct {
	done     chan struct{}
	finished chan struct{}
	mid, pg  []cpuSample
}

type cpuSample struct {
	at  time.Time
	cpu time.Duration
}

func sampleCPU(pid int, pgCPU func() (time.Duration, error)) *cpuSampler {
	s := &cpuSampler{done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(s.finished)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for n := 0; ; n++ {
			if pid != 0 {
				if c, err := cpuTime(pid); err == nil {
					s.mid = append(s.mid, cpuSample{time.Now(), c})
				}
			}
			if n%4 == 0 {
				if c, err := pgCPU(); err == nil {
					s.pg = append(s.pg, cpuSample{time.Now(), c})
				}
			}
			select {
			case <-s.done:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// stop ends the sampling; nil: nothing to stop.
func (s *cpuSampler) stop() {
	if s != nil {
		close(s.done)
		<-s.finished
	}
}

// rates are the middleman's and PostgreSQL's CPU seconds per second over
// the samples between from and until; ok is false without two such samples
// of PostgreSQL's.
func (s *cpuSampler) rates(from, until time.Time) (mid, pg float64, ok bool) {
	rate := func(ss []cpuSample) (float64, bool) {
		ss = slices.DeleteFunc(slices.Clone(ss), func(c cpuSample) bool { return c.at.Before(from) || c.at.After(until) })
		if len(ss) < 2 {
			return 0, false
		}
		first, last := ss[0], ss[len(ss)-1]
		return (last.cpu - first.cpu).Seconds() / last.at.Sub(first.at).Seconds(), true
	}
	mid, _ = rate(s.mid)
	pg, ok = rate(s.pg)
	return mid, pg, ok
}

// dumpProxy saves, when a run against t hung or failed, the proxy's
// goroutines and /metrics in a file of the temporary directory, and says
// where.
func dumpProxy(w workload, t target, round int, why string) {
	if t.adminPort == 0 {
		return
	}
	c := http.Client{Timeout: 10 * time.Second}
	var out strings.Builder
	fmt.Fprintf(&out, "%s: %s against %s, round %d: %s\n\n", time.Now().Format(time.RFC3339), w.name, t.name, round+1, why)
	for _, path := range []string{"/debug/pprof/goroutine?debug=2", "/metrics"} {
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", t.adminPort, path))
		if err != nil {
			fmt.Fprintf(&out, "%s: %v\n", path, err)
			continue
		}
		fmt.Fprintf(&out, "==== %s\n", path)
		_, _ = io.Copy(&out, resp.Body)
		resp.Body.Close()
	}
	f, err := os.CreateTemp("", "rlsproxy-bench-dump-*.txt")
	if err != nil {
		fmt.Fprintln(os.Stderr, "dump:", err)
		return
	}
	defer f.Close()
	_, _ = f.WriteString(out.String())
	fmt.Fprintf(os.Stderr, "%s against %s hung or failed (%s): the proxy's goroutines and metrics are in %s\n", w.name, t.name, why, f.Name())
}

// failure names what went wrong in a run, from its extras; empty: nothing.
func failure(x extras) string {
	var why []string
	for _, k := range []string{"hung", "aborted", "failed", "errors", "login_errors", "wrong_user"} {
		if x[k] > 0 {
			why = append(why, fmt.Sprintf("%s %.0f", k, x[k]))
		}
	}
	return strings.Join(why, ", ")
}
