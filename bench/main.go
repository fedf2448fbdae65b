// Command bench measures rlsproxy against direct PostgreSQL and PgBouncer
// with pgbench, on a throwaway PostgreSQL. Each workload runs against every
// target in turn, round after round (the order rotates), so that ratios come
// from one run on one machine.
//
//	go run ./bench                       # everything, ~15 minutes
//	go run ./bench -workloads select-prepared,select-simple -duration 10s
//	go run ./bench -workloads tx-1000,many-users,connect-before  # transaction pooling (make bench-tx), ~15 minutes
//
// It prints a table (median tps, spread over rounds, ratios to direct and to
// PgBouncer, and PgBouncer's and rlsproxy's CPU time per transaction), the
// proxy's memory per idle client, and, with -markdown and -chart, writes the
// table as Markdown and a chart as SVG.
package main

import (
	"github.com/rlsproxy/rlsproxy/internal/sqlquote"

	"github.com/rlsproxy/rlsproxy/internal/devissuer"

	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

type target struct {
	name     string
	port     int
	password string
	pid      int // of the middleman's process (PgBouncer, rlsproxy): CPU and memory
	// optIn: measured only by the workloads that name it (the transaction
	// pooling targets), not by those that run against every target.
	optIn bool
	// adminPort serves the proxy's /metrics (and /debug/pprof with
	// -cpu-profile-dir); 0: none.
	adminPort int
	// tokens are the passwords of the many-users load's clients, one user
	// per token, handed out round-robin; nil: password.
	tokens []string
	// subjects are the tokens' subjects, which the load checks each
	// transaction ran as; nil: no check (not through the proxy).
	subjects []string
}

// A workload is a pgbench run, or a custom measurement.
type workload struct {
	name, desc string
	args       []string                                // pgbench arguments
	metric     string                                  // "tps", "latency_ms" or "MB/s"
	custom     func(t target) (float64, extras, error) // instead of pgbench
	targets    []string                                // only these targets; nil: all but the opt-in ones
	// tolerant: a pgbench run that fails is recorded (its figures, if it
	// printed any, and "aborted") rather than ending the benchmark.
	tolerant bool
}

// extras are a run's figures beyond the metric: latencies, failures, the
// proxy's counters.
type extras map[string]float64

type result struct {
	Workload string    `json:"workload"`
	Target   string    `json:"target"`
	Values   []float64 `json:"values"`
	// CPUPerTx is the middleman's CPU time (user+system) per transaction,
	// in µs, for each round: what relaying costs, apart from the noise of
	// the machine's other tenants.
	CPUPerTx []float64 `json:"cpu_us_per_tx,omitempty"`
	// Extra are further figures of each round, by name (see extras).
	Extra map[string][]float64 `json:"extra,omitempty"`
}

func main() {
	duration := flag.Duration("duration", 10*time.Second, "length of one pgbench run")
	rounds := flag.Int("rounds", 3, "runs of each workload against each target")
	clients := flag.Int("clients", 8, "pgbench clients (-c)")
	scale := flag.Int("scale", 10, "pgbench scale (-s)")
	only := flag.String("workloads", "select-prepared,select-simple,tpcb,connect,latency,copy-out,idle,guard-limits", "comma list of workloads; besides these, the transaction pooling ones (make bench-tx): tx-1000, many-users, connect-before")
	idle := flag.Int("idle-clients", 1000, "idle clients for the memory measurement")
	markdown := flag.String("markdown", "", "write the results as Markdown to this file (e.g. BENCHMARKS.md)")
	chart := flag.String("chart", "", "write the chart as SVG to this file (e.g. bench/chart.svg)")
	goroutines := flag.Bool("goroutine-relay", false, "also measure rlsproxy relaying with a goroutine pair per session (--relay-loops -1), as before the event loops")
	replot := flag.String("replot", "", "redraw -chart and -markdown from a results file of an earlier run instead of measuring")
	var tx txOptions
	flag.DurationVar(&tx.duration, "tx-duration", 25*time.Second, "length of one run of the transaction pooling workloads (tx-1000, many-users)")
	flag.IntVar(&tx.clients, "tx-clients", 1000, "pgbench clients of tx-1000")
	flag.IntVar(&tx.upstream, "tx-upstream", 20, "upstream connections of the transaction-pooled targets: rlsproxy --max-upstream-conns and --pool-size, PgBouncer default_pool_size")
	flag.IntVar(&tx.muClients, "mu-clients", 200, "clients of many-users")
	flag.IntVar(&tx.muUsers, "mu-users", 200, "distinct users (tokens) of many-users")
	flag.DurationVar(&tx.muThink, "mu-think", 10*time.Millisecond, "think time of many-users' clients between transactions")
	flag.StringVar(&tx.beforeBin, "before-bin", "", "rlsproxy binary measured as \"rlsproxy before\" by connect-before; empty: built from -before-rev")
	flag.StringVar(&tx.beforeRev, "before-rev", "df25d05", "commit built for \"rlsproxy before\" when -before-bin is empty: the last before sessions were released without DISCARD ALL")
	flag.StringVar(&tx.profileDir, "cpu-profile-dir", "", "save CPU profiles of the transaction-pooled rlsproxy (its first round of tx-1000 and many-users) in this directory")
	proxyRev := flag.String("proxy-rev", "", "measure the proxy of this commit (git archive, go build) instead of the working tree's")
	flag.Parse()
	b := &bench{proxyRev: *proxyRev, duration: *duration, rounds: *rounds, clients: *clients, scale: *scale, idleClients: *idle,
		only: strings.Split(*only, ","), markdownFile: *markdown, chartFile: *chart, goroutineRelay: *goroutines, tx: tx}
	run := b.run
	if *replot != "" {
		run = func() error { return b.replot(*replot) }
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type bench struct {
	duration            time.Duration
	rounds, clients     int
	scale, idleClients  int
	only                []string
	markdownFile        string
	goroutineRelay      bool
	chartFile           string
	dir, loginPassword  string
	pg                  *pgtemp.Cluster
	targets             []target
	results             []result
	idleBytesPerClient  float64
	guardLimits         *guardLimits
	commandLine, header string
	notes               string // appended to the Markdown (see notes.md)
	tx                  txOptions
	proxyRev            string   // the commit measured; empty: the working tree
	txHeader            string   // the transaction pooling section's
	txSaved             *savedTx // what that section says of its run
}

func (b *bench) run() error {
	ctx := context.Background()
	var err error
	if b.dir, err = os.MkdirTemp("", "rlsproxy-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(b.dir)
	if err := os.Chmod(b.dir, 0o755); err != nil {
		return err
	}
	bin := filepath.Join(b.dir, "rlsproxy")
	if b.proxyRev != "" {
		if bin, err = buildAt(b.dir, b.proxyRev, "measured"); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(os.Stderr, "building rlsproxy...")
		if out, err := exec.Command("go", "build", "-o", bin, "./cmd/rlsproxy").CombinedOutput(); err != nil {
			return fmt.Errorf("go build: %v\n%s", err, out)
		}
	}

	fmt.Fprintln(os.Stderr, "starting PostgreSQL...")
	raiseFileLimit(b.tx.clients + 1000) // pgbench and PgBouncer hold a descriptor per client
	b.pg, err = pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{
		"max_connections": strconv.Itoa(b.maxConnections()), "shared_buffers": "256MB"}})
	if err != nil {
		return err
	}
	defer b.pg.Stop()
	if err := b.pg.Exec(ctx, "postgres", "CREATE DATABASE bench"); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "pgbench -i -s %d...\n", b.scale)
	if _, err := pgbench(b.pg.Port, "postgres", b.pg.Password, "-i", "-q", "-s", strconv.Itoa(b.scale)); err != nil {
		return err
	}
	b.loginPassword = rand.Text()
	if err := b.pg.Exec(ctx, "bench", `
		CREATE ROLE authenticated NOLOGIN;
		CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD `+sqlquote.Literal(b.loginPassword)+`;
		GRANT authenticated TO authenticator;
		GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO authenticated, authenticator;`); err != nil {
		return err
	}

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	il, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	issuer, err := devissuer.New("http://"+il.Addr().String(), key)
	if err != nil {
		return err
	}
	go func() { _ = http.Serve(il, issuer) }()
	token, err := issuer.Mint(devissuer.TokenRequest{Subject: "bench", TTL: 24 * time.Hour})
	if err != nil {
		return err
	}

	b.targets = []target{{name: "direct", port: b.pg.Port, password: b.loginPassword}}
	bouncerPort, bouncerPID, stopBouncer, err := b.startPgBouncer()
	if err != nil {
		return err
	}
	defer stopBouncer()
	b.targets = append(b.targets, target{name: "pgbouncer", port: bouncerPort, password: b.loginPassword, pid: bouncerPID})
	upstream := b.pg.URL("authenticator", b.loginPassword, "bench")
	for _, guard := range []string{"on", "off"} {
		args, admin := []string{"--guard", guard}, 0
		if guard == "on" && slices.Contains(b.only, "connect-before") {
			// Its /metrics: how many connections were released without a reset.
			if admin, err = pgtemp.FreePort(); err != nil {
				return err
			}
			args = append(args, "--admin-listen", fmt.Sprintf("127.0.0.1:%d", admin))
		}
		port, pid, stop, err := startProxy(bin, upstream, issuer.URL, args...)
		if err != nil {
			return err
		}
		defer stop()
		b.targets = append(b.targets, target{name: "rlsproxy guard " + guard, port: port, password: token, pid: pid, adminPort: admin})
	}
	if b.goroutineRelay {
		port, pid, stop, err := startProxy(bin, upstream, issuer.URL, "--relay-loops", "-1")
		if err != nil {
			return err
		}
		defer stop()
		b.targets = append(b.targets, target{name: "rlsproxy goroutines", port: port, password: token, pid: pid})
	}
	stopTx, err := b.startTxTargets(bin, upstream, issuer, token)
	if err != nil {
		return err
	}
	defer stopTx()

	common := []string{"-n", "-c", strconv.Itoa(b.clients), "-j", "2", "-T", strconv.Itoa(int(b.duration.Seconds()))}
	one := []string{"-n", "-c", "1", "-j", "1", "-T", strconv.Itoa(int(b.duration.Seconds()))}
	workloads := []workload{
		{name: "select-prepared", desc: "pgbench -S -M prepared", metric: "tps", args: append([]string{"-S", "-M", "prepared"}, common...)},
		{name: "select-simple", desc: "pgbench -S -M simple", metric: "tps", args: append([]string{"-S", "-M", "simple"}, common...)},
		{name: "tpcb", desc: "pgbench (tpcb-like) -M prepared", metric: "tps", args: append([]string{"-M", "prepared"}, common...)},
		{name: "connect", desc: "pgbench -S -C (connect per transaction)", metric: "tps", args: append([]string{"-S", "-C"}, common...),
			targets: []string{"direct", "pgbouncer", "rlsproxy guard on"}},
		{name: "latency", desc: "pgbench -S -M prepared -c 1: latency", metric: "latency_ms", args: append([]string{"-S", "-M", "prepared"}, one...),
			targets: []string{"direct", "pgbouncer", "rlsproxy guard on", "rlsproxy goroutines"}},
		{name: "copy-out", desc: "COPY of 2M rows (~230 MB) TO STDOUT", metric: "MB/s", custom: b.copyOut,
			targets: []string{"direct", "pgbouncer", "rlsproxy guard on", "rlsproxy goroutines"}},
	}
	workloads = append(workloads, b.txWorkloads(common)...)
	b.commandLine = "go run ./bench " + strings.Join(os.Args[1:], " ")
	if notes, err := os.ReadFile("bench/notes.md"); err == nil {
		b.notes = string(notes)
	}
	b.header = fmt.Sprintf("machine: %d cores, %s; PostgreSQL %s via pgtemp (SCRAM); PgBouncer %s (session mode); pgbench scale %d, %d clients, %s per run, %d rounds",
		cpus(), memTotal(), serverVersion(b.pg), bouncerVersion(), b.scale, b.clients, b.duration, b.rounds)
	b.txHeader = fmt.Sprintf("machine: %d cores, %s; PostgreSQL %s via pgtemp (SCRAM, max_connections %d); PgBouncer %s; pgbench scale %d; %d rounds",
		cpus(), memTotal(), serverVersion(b.pg), b.maxConnections(), bouncerVersion(), b.scale, b.rounds)
	b.txSaved = &savedTx{Clients: b.tx.clients, Upstream: b.tx.upstream, MuClients: b.tx.muClients, MuUsers: b.tx.muUsers,
		MuThinkMs: float64(b.tx.muThink.Microseconds()) / 1000, Duration: b.tx.duration.String(), Source: b.tx.source, Before: b.tx.builtBefore,
		Pgbench: map[string]string{}}
	for _, w := range workloads {
		if isTxWorkload(w.name) && w.custom == nil {
			b.txSaved.Pgbench[w.name] = strings.Join(w.args, " ")
		}
	}
	fmt.Println(b.header)
	fmt.Println("command:", b.commandLine)
	fmt.Println()
	for _, w := range workloads {
		if !slices.Contains(b.only, w.name) {
			continue
		}
		if err := b.measure(w); err != nil {
			return err
		}
	}
	if slices.Contains(b.only, "idle") {
		if err := b.measureIdle(); err != nil {
			return err
		}
	}
	if slices.Contains(b.only, "guard-limits") {
		if err := b.measureGuardLimits(bin, upstream, issuer.URL, token); err != nil {
			return err
		}
	}
	return b.write()
}

func (b *bench) measure(w workload) error {
	var ts []target
	for _, t := range b.targets {
		if (w.targets == nil && !t.optIn) || slices.Contains(w.targets, t.name) {
			ts = append(ts, t)
		}
	}
	fmt.Fprintf(os.Stderr, "%s...\n", w.name)
	values, cpu := map[string][]float64{}, map[string][]float64{}
	extra := map[string]map[string][]float64{}
	for r := 0; r < b.rounds; r++ {
		for i := range ts {
			// Rotate the order between rounds, and run it backwards every
			// other round, so that no target always follows another.
			j := (i + r) % len(ts)
			if r%2 == 1 {
				j = len(ts) - 1 - j
			}
			t := ts[j]
			var v float64
			var x extras
			var err error
			if isTxWorkload(w.name) { // a time to match the proxies' log lines with
				fmt.Fprintf(os.Stderr, "%s %s against %s, round %d\n", time.Now().Format(time.TimeOnly), w.name, t.name, r+1)
			}
			before, _ := scrapeMetrics(t.adminPort)
			pgBefore, _ := b.pgCPU()
			selfBefore := selfCPU()
			stopProfile := b.profile(w, t, r)
			if w.custom != nil {
				cpuBefore, _ := cpuTime(t.pid)
				v, x, err = w.custom(t)
				if cpuAfter, cerr := cpuTime(t.pid); cerr == nil && t.pid != 0 && x["tx"] > 0 {
					cpu[t.name] = append(cpu[t.name], float64((cpuAfter-cpuBefore).Microseconds())/x["tx"])
				}
			} else {
				var perTx float64
				v, perTx, x, err = pgbenchMetric(t, w.metric, w.args, w.tolerant, b.pgCPU)
				if perTx > 0 {
					cpu[t.name] = append(cpu[t.name], perTx)
				}
			}
			stopProfile()
			if why := failure(x); why != "" {
				dumpProxy(w, t, r, why)
			}
			if err != nil {
				return fmt.Errorf("%s against %s: %w", w.name, t.name, err)
			}
			// Only the transaction pooling section shows where the CPU went.
			if pgAfter, perr := b.pgCPU(); perr == nil && isTxWorkload(w.name) && x["tx"] > 0 {
				x["pg_cpu_us_per_tx"] = float64((pgAfter - pgBefore).Microseconds()) / x["tx"]
				if w.custom != nil { // the client is this process
					x["client_cpu_us_per_tx"] = float64((selfCPU() - selfBefore).Microseconds()) / x["tx"]
				}
			}
			if after, err := scrapeMetrics(t.adminPort); err == nil && before != nil {
				x = proxyCounters(x, before, after)
			}
			values[t.name] = append(values[t.name], v)
			if len(x) > 0 && extra[t.name] == nil {
				extra[t.name] = map[string][]float64{}
			}
			for k, xv := range x {
				extra[t.name][k] = append(extra[t.name][k], xv)
			}
		}
	}
	for _, t := range ts {
		b.results = append(b.results, result{Workload: w.name, Target: t.name, Values: values[t.name], CPUPerTx: cpu[t.name], Extra: extra[t.name]})
	}
	b.printWorkload(w, ts)
	return nil
}

func (b *bench) printWorkload(w workload, ts []target) {
	direct, bouncer := b.median(w.name, "direct"), b.median(w.name, "pgbouncer")
	bouncerName := "pgbouncer"
	if v := b.median(w.name, bouncerTx); v > 0 {
		bouncer, bouncerName = v, bouncerTx
	}
	fmt.Printf("%s (%s, %s)\n", w.name, w.desc, w.metric)
	for _, t := range ts {
		v := b.values(w.name, t.name)
		m := median(v)
		spread := fmt.Sprintf("%.4g-%.4g", slices.Min(v), slices.Max(v))
		fmt.Printf("  %-22s %10.4g  spread %-18s  /direct %5.2f  /%s %5.2f", t.name, m, spread, m/direct, bouncerName, m/bouncer)
		if c := b.result(w.name, t.name).CPUPerTx; len(c) > 0 {
			fmt.Printf("  CPU %.1f µs/tx", median(c))
		}
		if isTxWorkload(w.name) {
			x := b.result(w.name, t.name).Extra
			for _, k := range slices.Sorted(maps.Keys(x)) {
				fmt.Printf("  %s %.4g", k, median(x[k]))
			}
		}
		fmt.Println()
	}
	if w.metric == "latency_ms" {
		fmt.Printf("  added latency per round trip: pgbouncer %+.0f µs, rlsproxy %+.0f µs\n",
			1000*(bouncer-direct), 1000*(b.median(w.name, "rlsproxy guard on")-direct))
	}
	if on, off := b.median(w.name, "rlsproxy guard on"), b.median(w.name, "rlsproxy guard off"); on > 0 && off > 0 {
		fmt.Printf("  guard cost: %.1f%% (guard on %.4g vs off %.4g)\n", 100*(1-on/off), on, off)
	}
	fmt.Println()
}

// result returns the result of workload w against target t (empty if not measured).
func (b *bench) result(w, t string) result {
	for _, r := range b.results {
		if r.Workload == w && r.Target == t {
			return r
		}
	}
	return result{}
}

func (b *bench) values(w, t string) []float64 { return b.result(w, t).Values }

func (b *bench) median(w, t string) float64 { return median(b.values(w, t)) }

// copyOut streams a large COPY TO STDOUT through t and returns MB/s.
func (b *bench) copyOut(t target) (float64, extras, error) {
	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, fmt.Sprintf("host=127.0.0.1 port=%d user=authenticator password=%s dbname=bench sslmode=disable", t.port, t.password))
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close(ctx)
	cw := &countWriter{}
	start := time.Now()
	if _, err := conn.CopyTo(ctx, cw, "COPY (SELECT g, md5(g::text), repeat('x', 60) FROM generate_series(1, 2000000) g) TO STDOUT"); err != nil {
		return 0, nil, err
	}
	return float64(cw.n) / 1e6 / time.Since(start).Seconds(), nil, nil
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// measureIdle opens idle sessions through the proxy and reads its RSS.
func (b *bench) measureIdle() error {
	t := b.targets[slices.IndexFunc(b.targets, func(t target) bool { return t.name == "rlsproxy guard on" })]
	fmt.Fprintf(os.Stderr, "idle: %d clients...\n", b.idleClients)
	ctx := context.Background()
	before, err := rss(t.pid)
	if err != nil {
		return err
	}
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=authenticator password=%s dbname=bench sslmode=disable", t.port, t.password)
	conns := make([]*pgconn.PgConn, 0, b.idleClients)
	defer func() {
		for _, c := range conns {
			c.Close(ctx)
		}
	}()
	for range b.idleClients {
		c, err := pgconn.Connect(ctx, dsn)
		if err != nil {
			return fmt.Errorf("idle client %d: %w", len(conns)+1, err)
		}
		if _, err := c.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
			return err
		}
		conns = append(conns, c)
	}
	time.Sleep(2 * time.Second) // let the runtime settle
	after, err := rss(t.pid)
	if err != nil {
		return err
	}
	b.idleBytesPerClient = float64(after-before) / float64(b.idleClients)
	fmt.Printf("idle (%d sessions through rlsproxy): RSS %.1f MiB -> %.1f MiB, %.1f KiB per idle client\n\n",
		b.idleClients, float64(before)/(1<<20), float64(after)/(1<<20), b.idleBytesPerClient/1024)
	return nil
}

// startPgBouncer runs PgBouncer in session mode in front of the cluster, with
// SCRAM for its clients, as the login role.
func (b *bench) startPgBouncer() (port, pid int, stop func(), err error) {
	return b.startPgBouncerMode("session", 100)
}

// startPgBouncerMode runs PgBouncer in poolMode (session or transaction)
// with poolSize server connections.
func (b *bench) startPgBouncerMode(poolMode string, poolSize int) (port, pid int, stop func(), err error) {
	if _, err := exec.LookPath("pgbouncer"); err != nil {
		if _, err := os.Stat("/usr/sbin/pgbouncer"); err != nil {
			return 0, 0, nil, errors.New("pgbouncer not found: apt-get install -y pgbouncer")
		}
	}
	if port, err = pgtemp.FreePort(); err != nil {
		return 0, 0, nil, err
	}
	users := filepath.Join(b.dir, "userlist.txt")
	ini := filepath.Join(b.dir, "pgbouncer-"+poolMode+".ini")
	if err := os.WriteFile(users, []byte(fmt.Sprintf("%q %q\n", "authenticator", b.loginPassword)), 0o644); err != nil {
		return 0, 0, nil, err
	}
	conf := fmt.Sprintf(`[databases]
bench = host=127.0.0.1 port=%d dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = scram-sha-256
auth_file = %s
pool_mode = %s
default_pool_size = %d
max_client_conn = 5000
log_connections = 0
log_disconnections = 0
`, b.pg.Port, port, users, poolMode, poolSize)
	if err := os.WriteFile(ini, []byte(conf), 0o644); err != nil {
		return 0, 0, nil, err
	}
	bin := "pgbouncer"
	if _, err := exec.LookPath(bin); err != nil {
		bin = "/usr/sbin/pgbouncer"
	}
	cmd := exec.Command(bin, ini)
	if os.Geteuid() == 0 { // PgBouncer refuses to run as root
		u, err := user.Lookup("postgres")
		if err != nil {
			return 0, 0, nil, err
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, 0, nil, err
	}
	stop = func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() }
	if err := waitPort(port); err != nil {
		stop()
		return 0, 0, nil, fmt.Errorf("pgbouncer: %w", err)
	}
	return port, cmd.Process.Pid, stop, nil
}

// startProxy runs `rlsproxy serve` on a free port and waits until it accepts.
func startProxy(bin, upstream, issuer string, extra ...string) (port, pid int, stop func(), err error) {
	if port, err = pgtemp.FreePort(); err != nil {
		return 0, 0, nil, err
	}
	args := append([]string{"serve", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--upstream", upstream,
		"--issuer", issuer, "--client-id", devissuer.ClientID, "--admin-listen", "", "--log-level", "warn",
		"--max-client-conns", "5000", "--pool-size", "100"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if env := os.Getenv("BENCH_PROXY_ENV"); env != "" {
		cmd.Env = append(os.Environ(), strings.Fields(env)...)
	}
	if err := cmd.Start(); err != nil {
		return 0, 0, nil, err
	}
	stop = func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() }
	if err := waitPort(port); err != nil {
		stop()
		return 0, 0, nil, fmt.Errorf("rlsproxy: %w", err)
	}
	return port, cmd.Process.Pid, stop, nil
}

var (
	tpsLine     = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)
	tpsLineC    = regexp.MustCompile(`tps = ([0-9.]+) \(including reconnection times\)`)
	latencyLine = regexp.MustCompile(`latency average = ([0-9.]+) ms`)
	txLine      = regexp.MustCompile(`number of transactions actually processed: ([0-9]+)`)
	failedLine  = regexp.MustCompile(`number of failed transactions: ([0-9]+)`)
	connectLine = regexp.MustCompile(`initial connection time = ([0-9.]+) ms`)
)

// pgbenchMetric runs pgbench against t and returns the metric, for a
// target with a middleman process its CPU time per transaction in µs, and
// pgbench's other figures (extras: latency_ms, connect_ms, tx, failed,
// aborted). tolerant: a failed run is reported in aborted, with whatever
// figures it printed, rather than as an error.
func pgbenchMetric(t target, metric string, args []string, tolerant bool, pgCPU func() (time.Duration, error)) (value, cpuPerTx float64, x extras, err error) {
	before, _ := cpuTime(t.pid)
	var timeout time.Duration
	var steady *cpuSampler
	if tolerant {
		timeout = pgbenchTimeout(args)
		if !slices.Contains(args, "-C") {
			steady = sampleCPU(t.pid, pgCPU)
		}
	}
	began := time.Now()
	out, clientCPU, err := pgbenchCPU(timeout, t.port, "authenticator", t.password, args...)
	steady.stop()
	x = extras{}
	if err != nil {
		if !tolerant {
			return 0, 0, nil, err
		}
		fmt.Fprintf(os.Stderr, "pgbench against %s failed (recorded as aborted): %v\n", t.name, err)
		out, x["aborted"] = err.Error(), 1
		if strings.Contains(out, "killed (hung?)") {
			x["hung"] = 1
		}
	}
	for name, re := range map[string]*regexp.Regexp{"latency_ms": latencyLine, "connect_ms": connectLine, "tx": txLine, "failed": failedLine} {
		if m := re.FindStringSubmatch(out); m != nil {
			x[name], _ = strconv.ParseFloat(m[1], 64)
		}
	}
	if x["tx"] > 0 {
		x["client_cpu_us_per_tx"] = float64(clientCPU.Microseconds()) / x["tx"]
	}
	if t.pid != 0 {
		after, err := cpuTime(t.pid)
		if m := txLine.FindStringSubmatch(out); err == nil && m != nil {
			if n, _ := strconv.ParseFloat(m[1], 64); n > 0 {
				cpuPerTx = float64((after - before).Microseconds()) / n
			}
		}
	}
	re := tpsLine
	switch {
	case metric == "latency_ms":
		re = latencyLine
	case slices.Contains(args, "-C"):
		re = tpsLineC
	}
	m := re.FindStringSubmatch(out)
	if m == nil {
		if x["aborted"] > 0 {
			return 0, 0, x, nil
		}
		return 0, 0, nil, fmt.Errorf("no %s in pgbench output:\n%s", metric, out)
	}
	value, err = strconv.ParseFloat(m[1], 64)
	if steady != nil && err == nil && value > 0 {
		// After the logins: from the end of pgbench's initial connection
		// time (and half a second) to the end of its -T.
		loggedIn := began.Add(time.Duration(x["connect_ms"] * float64(time.Millisecond)))
		if mid, pg, ok := steady.rates(loggedIn.Add(500*time.Millisecond), loggedIn.Add(pgbenchDuration(args))); ok {
			if t.pid != 0 {
				x["steady_cpu_us_per_tx"] = 1e6 * mid / value
			}
			x["steady_pg_cpu_us_per_tx"] = 1e6 * pg / value
		}
	}
	return value, cpuPerTx, x, err
}

// cpuTime reads a process's user+system CPU time from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields count from its ')'.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticksPerSecond = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / ticksPerSecond, nil
}

func pgbench(port int, user, password string, args ...string) (string, error) {
	out, _, err := pgbenchCPU(0, port, user, password, args...)
	return out, err
}

// pgbenchCPU runs pgbench and returns its output and the CPU time
// (user+system) it spent; a run still going after timeout (0: none) is
// killed, and fails.
func pgbenchCPU(timeout time.Duration, port int, user, password string, args ...string) (string, time.Duration, error) {
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, "pgbench", append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", user}, append(args, "bench")...)...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("still running after %s, killed (hung?): %w", timeout, err)
	}
	var cpu time.Duration
	if cmd.ProcessState != nil {
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if err != nil {
		return "", cpu, fmt.Errorf("pgbench %v: %v\n%s", args, err, out)
	}
	return string(out), cpu, nil
}

func rss(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, err := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS")
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func waitPort(port int) error {
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("did not start listening")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func cpus() int {
	out, err := exec.Command("nproc").Output()
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

func memTotal() string {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "? GiB"
	}
	f := strings.Fields(strings.SplitN(string(data), "\n", 2)[0])
	kb, _ := strconv.ParseFloat(f[1], 64)
	return fmt.Sprintf("%.0f GiB", kb/(1<<20))
}

func serverVersion(pg *pgtemp.Cluster) string {
	conn, err := pgconn.Connect(context.Background(), pg.SuperDSN("postgres"))
	if err != nil {
		return "?"
	}
	defer conn.Close(context.Background())
	return conn.ParameterStatus("server_version")
}

func bouncerVersion() string {
	bin := "pgbouncer"
	if _, err := exec.LookPath(bin); err != nil {
		bin = "/usr/sbin/pgbouncer"
	}
	out, _ := exec.Command(bin, "--version").Output()
	f := strings.Fields(string(out))
	if len(f) >= 2 {
		return f[1]
	}
	return "?"
}
