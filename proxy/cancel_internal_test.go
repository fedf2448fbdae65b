package proxy

import (
	"context"
	"testing"
	"time"
)

// slowCanceler stands for an upstream that takes a while to reach.
type slowCanceler struct{ delivered chan struct{} }

func (s *slowCanceler) Cancel(ctx context.Context) error {
	time.Sleep(100 * time.Millisecond)
	close(s.delivered)
	return nil
}

// A cancel under way when its session ends is delivered before unregister
// returns, so the connection cannot go back to the pool with a cancel still
// on its way to it (it would reach the next session's statement); a cancel
// that comes after is ignored.
func TestCancelDeliveredBeforeUnregister(t *testing.T) {
	reg := newCancelRegistry()
	target := &slowCanceler{delivered: make(chan struct{})}
	key := reg.register(target)
	go reg.cancel(context.Background(), key.pid, key.secret[:])
	time.Sleep(20 * time.Millisecond) // the cancel is under way
	reg.unregister(key)
	select {
	case <-target.delivered:
	default:
		t.Fatal("unregister returned while a cancel for the session was still under way")
	}
	if reg.cancel(context.Background(), key.pid, key.secret[:]) {
		t.Fatal("a cancel after unregister was forwarded")
	}
}
