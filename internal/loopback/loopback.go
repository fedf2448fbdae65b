// Package loopback tells whether a peer or a host is this machine. Traffic
// that never leaves it may carry a token in plaintext, is not rate-limited
// for failed logins (a sidecar's application), and may fetch keys over http.
package loopback

import "net"

// Host reports whether host, a name or an IP address, names this machine's
// loopback.
func Host(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Addr reports whether a peer's address is this machine: a unix socket, or
// a loopback IP address.
func Addr(a net.Addr) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	}
	return false
}
