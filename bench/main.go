// Command bench measures rlsproxy with pgbench against a throwaway
// PostgreSQL: each workload runs against every target in turn, round after
// round, so that ratios come from one run on one machine.
//
//	go run ./bench -duration 10s -rounds 3
//
// Targets: direct PostgreSQL (the login role, SCRAM), rlsproxy with the
// guard on, and rlsproxy with the guard off. It prints a table of tps with
// the median, the spread over rounds, and the ratio to direct.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/internal/pgtemp"
)

type target struct {
	name     string
	port     int
	password string
}

type workload struct {
	name string
	args []string
}

func main() {
	duration := flag.Duration("duration", 10*time.Second, "length of one pgbench run")
	rounds := flag.Int("rounds", 3, "runs of each workload against each target")
	clients := flag.Int("clients", 8, "pgbench clients (-c)")
	scale := flag.Int("scale", 10, "pgbench scale (-s)")
	only := flag.String("workloads", "select-prepared,select-simple", "comma list of workloads: select-prepared, select-simple")
	flag.Parse()
	if err := run(*duration, *rounds, *clients, *scale, strings.Split(*only, ",")); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(duration time.Duration, rounds, clients, scale int, only []string) error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "rlsproxy-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "rlsproxy")
	fmt.Fprintln(os.Stderr, "building rlsproxy...")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/rlsproxy").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}

	fmt.Fprintln(os.Stderr, "starting PostgreSQL...")
	pg, err := pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{"max_connections": "300", "shared_buffers": "256MB"}})
	if err != nil {
		return err
	}
	defer pg.Stop()
	if err := pg.Exec(ctx, "postgres", "CREATE DATABASE bench"); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "pgbench -i -s %d...\n", scale)
	if err := pgbench(pg.Port, "postgres", pg.Password, "bench", "-i", "-q", "-s", strconv.Itoa(scale)); err != nil {
		return err
	}
	loginPassword := rand.Text()
	if err := pg.Exec(ctx, "bench", `
		CREATE ROLE authenticated NOLOGIN;
		CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD `+pgtemp.QuoteLiteral(loginPassword)+`;
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
	issuer, err := auth.NewDevIssuer("http://"+il.Addr().String(), key)
	if err != nil {
		return err
	}
	go func() { _ = http.Serve(il, issuer) }()
	token, err := issuer.Mint(auth.TokenRequest{Subject: "bench", TTL: 24 * time.Hour})
	if err != nil {
		return err
	}

	upstream := pg.URL("authenticator", loginPassword, "bench")
	targets := []target{{name: "direct", port: pg.Port, password: loginPassword}}
	for _, guard := range []string{"off", "on"} {
		port, stop, err := startProxy(bin, upstream, issuer.URL, "--guard", guard)
		if err != nil {
			return err
		}
		defer stop()
		targets = append(targets, target{name: "rlsproxy guard " + guard, port: port, password: token})
	}

	workloads := []workload{
		{"select-prepared", []string{"-S", "-M", "prepared"}},
		{"select-simple", []string{"-S", "-M", "simple"}},
	}
	common := []string{"-n", "-c", strconv.Itoa(clients), "-j", "2", "-T", strconv.Itoa(int(duration.Seconds()))}
	fmt.Printf("machine: %d cores; PostgreSQL via pgtemp; pgbench scale %d, %d clients, %s per run, %d rounds\n",
		cpus(), scale, clients, duration, rounds)
	fmt.Printf("command: go run ./bench -duration %s -rounds %d -clients %d -scale %d -workloads %s\n\n",
		duration, rounds, clients, scale, strings.Join(only, ","))
	fmt.Printf("%-16s %-18s %10s %22s %8s\n", "workload", "target", "tps", "spread (min-max)", "/direct")
	for _, w := range workloads {
		if !slices.Contains(only, w.name) {
			continue
		}
		results := map[string][]float64{}
		for r := 0; r < rounds; r++ {
			for i := range targets {
				t := targets[(i+r)%len(targets)] // rotate the order between rounds
				tps, err := pgbenchTPS(t, append(w.args, common...))
				if err != nil {
					return fmt.Errorf("%s against %s: %w", w.name, t.name, err)
				}
				results[t.name] = append(results[t.name], tps)
			}
		}
		direct := median(results["direct"])
		for _, t := range targets {
			v := results[t.name]
			fmt.Printf("%-16s %-18s %10.0f %10.0f-%-11.0f %8.2f\n", w.name, t.name, median(v), slices.Min(v), slices.Max(v), median(v)/direct)
		}
		if on, off := median(results["rlsproxy guard on"]), median(results["rlsproxy guard off"]); off > 0 {
			fmt.Printf("%-16s guard cost: %.1f%% of throughput (guard on %.0f vs off %.0f tps)\n\n", w.name, 100*(1-on/off), on, off)
		}
	}
	return nil
}

// startProxy runs `rlsproxy serve` on a free port and waits until it accepts.
func startProxy(bin, upstream, issuer string, extra ...string) (int, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	args := append([]string{"serve", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--upstream", upstream,
		"--issuer", issuer, "--client-id", auth.DevClientID, "--admin-listen", "", "--log-level", "warn",
		"--max-client-conns", "5000"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, nil, err
	}
	stop := func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() }
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return port, stop, nil
		}
		if time.Now().After(deadline) {
			stop()
			return 0, nil, errors.New("rlsproxy did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var tpsLine = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

func pgbenchTPS(t target, args []string) (float64, error) {
	out, err := pgbenchOutput(t.port, "authenticator", t.password, "bench", args...)
	if err != nil {
		return 0, err
	}
	m := tpsLine.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no tps in pgbench output:\n%s", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

func pgbench(port int, user, password, db string, args ...string) error {
	_, err := pgbenchOutput(port, user, password, db, args...)
	return err
}

func pgbenchOutput(port int, user, password, db string, args ...string) (string, error) {
	cmd := exec.Command("pgbench", append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", user}, append(args, db)...)...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("pgbench %v: %v\n%s", args, err, out)
	}
	return string(out), nil
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

func cpus() int {
	out, err := exec.Command("nproc").Output()
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}
