package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A flag on the command line wins over RLSPROXY_<FLAG>, which wins over the
// default.
func TestFlagsFromEnvironment(t *testing.T) {
	t.Setenv("RLSPROXY_UPSTREAM", "postgres://env")
	t.Setenv("RLSPROXY_ROLE_MAP", "a=b")
	t.Setenv("RLSPROXY_LEEWAY", "1m")
	t.Setenv("RLSPROXY_INSECURE_PLAINTEXT", "true")
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	var o serveOptions
	o.register(fs)
	if err := parseFlags(fs, []string{"--role-map", "c=d"}); err != nil {
		t.Fatal(err)
	}
	if o.upstream != "postgres://env" || o.roleMap != "c=d" || o.leeway != time.Minute || !o.insecurePlaintext || o.role != "authenticated" {
		t.Fatalf("%+v", o)
	}
	t.Setenv("RLSPROXY_MAX_CLIENT_CONNS", "many")
	if err := parseFlags(flag.NewFlagSet("t", flag.ContinueOnError), nil); err != nil {
		t.Fatal("unrelated flag set read the environment")
	}
	fs = flag.NewFlagSet("t", flag.ContinueOnError)
	o.register(fs)
	if err := parseFlags(fs, nil); err == nil || !strings.Contains(err.Error(), "RLSPROXY_MAX_CLIENT_CONNS") {
		t.Fatalf("a bad environment value: %v", err)
	}
}

// rlsproxy token signs only with the dev key: an ordinary private key in
// its place is refused.
func TestTokenRefusesOtherKeys(t *testing.T) {
	dir := t.TempDir()
	k, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	for _, typ := range []string{"PRIVATE KEY", "RSA PRIVATE KEY"} {
		os.WriteFile(filepath.Join(dir, "dev-key.pem"), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
		os.WriteFile(filepath.Join(dir, "issuer.json"), []byte(`{"issuer":"https://cognito-idp.eu-west-1.amazonaws.com/pool"}`), 0o600)
		err := run([]string{"token", "--sub", "x", "--dev-dir", dir})
		if err == nil || !strings.Contains(err.Error(), "not an rlsproxy dev key") {
			t.Fatalf("%s: %v", typ, err)
		}
	}
	if err := run([]string{"token", "--sub", "x", "--dev-dir", t.TempDir()}); err == nil || !strings.Contains(err.Error(), "run `rlsproxy dev` first") {
		t.Fatalf("no dev key: %v", err)
	}
}

// The README's first command: `rlsproxy dev` starts a throwaway Postgres
// and an issuer, and the psql lines it prints show each user only their own
// notes. `rlsproxy token` mints more tokens for it. SIGTERM stops it.
func TestDevQuickstart(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "rlsproxy")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	devDir := t.TempDir()
	cmd := exec.Command(bin, "dev", "--listen", "127.0.0.1:0", "--admin-listen", "", "--dev-dir", devDir)
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var psqlLines []string
	timeout := time.After(60 * time.Second)
	for len(psqlLines) < 2 {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("rlsproxy dev exited:\n%s", stderr.String())
			}
			if strings.Contains(l, "PGPASSWORD=") {
				psqlLines = append(psqlLines, strings.TrimSpace(l))
			}
		case <-timeout:
			t.Fatalf("rlsproxy dev printed no psql lines:\n%s", stderr.String())
		}
	}
	// Both tables: the seed's policy (notes) and the recommended one
	// (todos, auth.user_id()).
	want := map[string]string{
		"user1": "1|user1|user1: buy milk\n2|user1|user1: call the bank\n1|user1|user1: review the pull request",
		"user2": "3|user2|user2: water the plants\n2|user2|user2: book the train",
	}
	for _, l := range psqlLines {
		user := regexp.MustCompile(`user=(\w+)`).FindStringSubmatch(l)[1]
		out, err := exec.Command("bash", "-c", strings.Replace(l, "psql ", "psql -X -A -t ", 1)).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != want[user] {
			t.Fatalf("%s: %v\n%s", user, err, out)
		}
	}

	tok, err := exec.Command(bin, "token", "--sub", "user2", "--dev-dir", devDir).Output()
	if err != nil {
		t.Fatal(err)
	}
	conninfo := regexp.MustCompile(`"(host=[^"]+)"`).FindStringSubmatch(psqlLines[0])[1]
	conninfo = strings.Replace(conninfo, "user=user1", "user=user2", 1)
	c := exec.Command("psql", "-X", "-A", "-t", conninfo, "-c", "SELECT count(*) FROM notes",
		"-c", "SELECT session_user, current_user, auth.user_id()")
	c.Env = append(os.Environ(), "PGPASSWORD="+strings.TrimSpace(string(tok)))
	// The recommended mode: the role's own login, signed claims.
	if out, err := c.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "1\nauthenticator_authenticated|authenticated|user2" {
		t.Fatalf("with a minted token: %v %s", err, out)
	}
	if key, err := os.ReadFile(filepath.Join(devDir, "signing.key")); err != nil || len(strings.TrimSpace(string(key))) != 64 {
		t.Fatalf("the dev dir's signing key: %v %q", err, key)
	}

	// SIGHUP (systemctl reload, a closed terminal) does not end it, nor a
	// transaction running meanwhile.
	inTx := exec.Command("psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo,
		"-c", "BEGIN", "-c", "SELECT pg_sleep(1)", "-c", "SELECT auth.user_id()", "-c", "COMMIT")
	inTx.Env = append(os.Environ(), "PGPASSWORD="+strings.TrimSpace(string(tok)))
	var txOut strings.Builder
	inTx.Stdout, inTx.Stderr = &txOut, &txOut
	if err := inTx.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := inTx.Wait(); err != nil || !strings.Contains(txOut.String(), "user2") {
		t.Fatalf("a transaction running during SIGHUP: %v\n%s\n%s", err, txOut.String(), stderr.String())
	}
	c = exec.Command("psql", "-X", "-A", "-t", conninfo, "-c", "SELECT auth.user_id()")
	c.Env = append(os.Environ(), "PGPASSWORD="+strings.TrimSpace(string(tok)))
	if out, err := c.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "user2" {
		t.Fatalf("after SIGHUP: %v %s\n%s", err, out, stderr.String())
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("rlsproxy dev exit: %v\n%s", err, stderr.String())
		}
	case <-time.After(40 * time.Second):
		t.Fatal("rlsproxy dev did not stop on SIGTERM")
	}
}

func TestVersion(t *testing.T) {
	if v := versionString(); !strings.HasPrefix(v, "rlsproxy ") {
		t.Fatal(v)
	}
	if err := run([]string{"nonsense"}); err == nil {
		t.Fatal("an unknown command ran")
	}
}

func TestHealth(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	if err := run([]string{"health", "--admin-listen", addr}); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"health", "--ready", "--admin-listen", addr}); err == nil {
		t.Fatal("an unready proxy passed --ready")
	}
	_, port, _ := strings.Cut(addr, ":")
	if err := run([]string{"health", "--admin-listen", "0.0.0.0:" + port}); err != nil {
		t.Fatalf("wildcard admin address: %v", err)
	}
}
