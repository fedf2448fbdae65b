package proxy

import (
	"context"
	"encoding/binary"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Several instances behind one address (a load balancer, a Kubernetes
// Service, processes sharing a port with SO_REUSEPORT) are one service to
// their clients, but a client's CancelRequest arrives on a connection of its
// own, which the balancer may give any instance: only the one holding the
// session knows its key. An instance that does not hold a key forwards the
// request to its peers (Config.Peers), marked as forwarded (codePeerCancel)
// so that no peer forwards it again; the instance that holds the key checks
// the secret as for any cancel. Keys are random (31 + 32 bits) on every
// instance, so no instance id needs configuring: a headless Service's DNS
// name, which resolves to every instance, is a complete peer list.

// codePeerCancel is a CancelRequest forwarded by a peer: the same packet
// under a code of rlsproxy's own, outside PostgreSQL's. A client may send it
// too; it is then a cancel that is not forwarded.
const codePeerCancel = 80877190

// maxPeerForwards bounds the forwards under way: a flood of unknown keys
// costs the peers no more than that many requests at once.
const maxPeerForwards = 64

// peerForwarder sends cancels this instance does not hold to its peers.
type peerForwarder struct {
	peers    []string // host:port; a host may be a DNS name for several
	resolver *net.Resolver
	slots    chan struct{}
}

func newPeerForwarder(peers []string) *peerForwarder {
	if len(peers) == 0 {
		return nil
	}
	return &peerForwarder{peers: peers, resolver: net.DefaultResolver, slots: make(chan struct{}, maxPeerForwards)}
}

// forward sends the cancel to every address of every peer, unless too many
// forwards are under way. It returns how many peers it reached.
func (f *peerForwarder) forward(ctx context.Context, pid uint32, secret []byte) int {
	if f == nil {
		return 0
	}
	select {
	case f.slots <- struct{}{}:
	default:
		return 0
	}
	defer func() { <-f.slots }()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	msg, err := (&pgproto3.CancelRequest{ProcessID: pid, SecretKey: secret}).Encode(nil)
	if err != nil {
		return 0
	}
	// The code is the second word of the packet.
	binary.BigEndian.PutUint32(msg[4:8], codePeerCancel)
	reached := 0
	for _, peer := range f.peers {
		host, port, err := net.SplitHostPort(peer)
		if err != nil {
			continue
		}
		addrs, err := f.resolver.LookupHost(ctx, host)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(a, port))
			if err != nil {
				continue
			}
			if dl, ok := ctx.Deadline(); ok {
				_ = c.SetDeadline(dl)
			}
			if _, err := c.Write(msg); err == nil {
				reached++
			}
			_ = c.Close()
		}
	}
	return reached
}
