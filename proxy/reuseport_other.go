//go:build !linux

package proxy

import (
	"errors"
	"syscall"
)

func setReusePort(_, _ string, _ syscall.RawConn) error {
	return errors.New("SO_REUSEPORT is supported on Linux only")
}
