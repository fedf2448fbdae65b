//go:build !linux

package proxy

import (
	"errors"
	"net"

	"github.com/rlsproxy/rlsproxy/internal/wire"
)

// relayLoops exist on Linux only; elsewhere every session is relayed by
// runConns.
type relayLoops struct{}

func newRelayLoops(int) (*relayLoops, error) {
	return nil, errors.New("relay event loops need Linux")
}

func (*relayLoops) close() {}

func (*relayLoops) run(*relay, net.Conn, *wire.Reader) bool { return false }
