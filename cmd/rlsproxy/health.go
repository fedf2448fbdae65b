package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"time"
)

// cmdHealth asks a running proxy's admin listener for /healthz (or /readyz
// with --ready). It is the Dockerfile's HEALTHCHECK: the image has no curl.
func cmdHealth(args []string) error {
	fs := flag.NewFlagSet("rlsproxy health", flag.ContinueOnError)
	admin := fs.String("admin-listen", "127.0.0.1:9187", "`address` of the proxy's admin listener")
	ready := fs.Bool("ready", false, "check /readyz (keys loaded, upstream answers) instead of /healthz")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *admin == "" {
		return errors.New("the admin listener is off (--admin-listen is empty)")
	}
	host, port, err := net.SplitHostPort(*admin)
	if err != nil {
		return fmt.Errorf("--admin-listen: %w", err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1" // a wildcard listener answers on loopback
	}
	path := "/healthz"
	if *ready {
		path = "/readyz"
	}
	client := &http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + net.JoinHostPort(host, port) + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", path, resp.Status)
	}
	return nil
}
