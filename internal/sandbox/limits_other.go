//go:build !linux

package sandbox

import (
	"os"
	"syscall"
)

func executable() (string, error) { return os.Executable() }

func sysProcAttr() *syscall.SysProcAttr { return nil }

// applyLimits enforces nothing outside Linux: helpers still contain crashes
// and timeouts, but not memory.
func applyLimits(memory uint64) error { return nil }

// dataProbe measures nothing outside Linux, so helpers are never retired for
// their memory there.
type dataProbe struct{}

func newDataProbe(pid int) *dataProbe { return nil }

func (*dataProbe) bytes() (uint64, bool) { return 0, false }

func (*dataProbe) close() {}
