// Package pgtemp starts a throwaway PostgreSQL cluster under a temporary
// directory, on a free loopback port, with SCRAM authentication. Tests use it,
// and so does `rlsproxy dev` for its demo database.
package pgtemp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Cluster is a running throwaway PostgreSQL server.
type Cluster struct {
	Dir      string // data directory parent; removed by Stop
	Port     int
	Password string // password of the superuser "postgres"
	cmd      *exec.Cmd
	done     chan error
}

// Options tune the server; zero values are fine.
type Options struct {
	// Settings are extra postgresql.conf settings (name -> value).
	Settings map[string]string
	// Log receives the server's output; nil discards it.
	Log *os.File
}

// BinDir finds the PostgreSQL server binaries: $PG_BINDIR, the newest
// /usr/lib/postgresql/*/bin, or the directory of initdb on PATH.
func BinDir() (string, error) {
	if d := os.Getenv("PG_BINDIR"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("PostgreSQL server binaries not found (initdb): install them, e.g. `apt-get install -y postgresql`, or set PG_BINDIR")
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// Start initialises and starts a cluster. The caller must call Stop.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "rlsproxy-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, Password: randomHex(16)}
	cred, err := serverCredential(dir)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(c.Password+"\n"), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(pwfile, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	initdb := exec.CommandContext(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres",
		"--auth=scram-sha-256", "--pwfile="+pwfile, "-E", "UTF8", "--locale=C", "--no-sync")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %w\n%s", err, out)
	}
	settings := map[string]string{
		"listen_addresses":         "127.0.0.1",
		"unix_socket_directories":  dir,
		"fsync":                    "off",
		"synchronous_commit":       "off",
		"full_page_writes":         "off",
		"max_connections":          "200",
		"password_encryption":      "scram-sha-256",
		"shared_preload_libraries": "",
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	for attempt := 0; ; attempt++ {
		c.Port, err = FreePort()
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		args := []string{"-D", data, "-p", strconv.Itoa(c.Port)}
		for k, v := range settings {
			args = append(args, "-c", k+"="+v)
		}
		c.cmd = exec.Command(filepath.Join(bin, "postgres"), args...)
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true}
		if opts.Log != nil {
			c.cmd.Stdout, c.cmd.Stderr = opts.Log, opts.Log
		}
		if err := c.cmd.Start(); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("start postgres: %w", err)
		}
		c.done = make(chan error, 1)
		go func(cmd *exec.Cmd, done chan error) { done <- cmd.Wait() }(c.cmd, c.done)
		err = c.waitReady(ctx)
		if err == nil {
			return c, nil
		}
		c.stopServer()
		if attempt == 3 || ctx.Err() != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
}

func (c *Cluster) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-c.done:
			return fmt.Errorf("postgres exited during startup: %v", err)
		default:
		}
		conn, err := pgconn.Connect(ctx, c.DSN("postgres", c.Password, "postgres"))
		if err == nil {
			conn.Close(ctx)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("postgres did not become ready: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// DSN returns a keyword/value connection string over TCP loopback.
func (c *Cluster) DSN(user, password, dbname string) string {
	return fmt.Sprintf("host=127.0.0.1 port=%d user=%s password=%s dbname=%s sslmode=disable", c.Port, user, password, dbname)
}

// URL returns a postgres:// URL over TCP loopback.
func (c *Cluster) URL(user, password, dbname string) string {
	return fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/%s?sslmode=disable", user, password, c.Port, dbname)
}

// SuperDSN is the DSN of the superuser on database dbname.
func (c *Cluster) SuperDSN(dbname string) string { return c.DSN("postgres", c.Password, dbname) }

// Exec runs SQL (may hold several statements) as the superuser on dbname.
func (c *Cluster) Exec(ctx context.Context, dbname, sql string) error {
	conn, err := pgconn.Connect(ctx, c.SuperDSN(dbname))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql).ReadAll()
	return err
}

// Stop shuts the server down and removes its directory.
func (c *Cluster) Stop() {
	c.stopServer()
	os.RemoveAll(c.Dir)
}

func (c *Cluster) stopServer() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGINT) // fast shutdown
	select {
	case <-c.done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		<-c.done
	}
	c.cmd = nil
}

// serverCredential returns the credential to run the server with. PostgreSQL
// refuses to run as root, so as root it runs as the "postgres" user (or
// "nobody"), and the directory is handed to that user.
func serverCredential(dir string) (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	var u *user.User
	var err error
	for _, name := range []string{"postgres", "nobody"} {
		if u, err = user.Lookup(name); err == nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("running as root and no postgres or nobody user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// FreePort returns a TCP port free on loopback now.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
