package proxy

import (
	"fmt"
	"time"
)

// watchdog ends, once a second, the sessions whose client stalled in the
// middle of a message (Config.FrameTimeout: a client that sent half a frame
// and stopped was kept forever) or sent nothing for too long while the
// server owed it nothing (Config.ClientIdleTimeout). One goroutine for all
// sessions, whatever relays them: an event loop has no read deadlines.
func (s *Server) watchdog() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.stopWatchdog:
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		frameTimeout, idleTimeout := time.Duration(s.frameTimeout.Load()), time.Duration(s.idleTimeout.Load())
		s.mu.Lock()
		for r := range s.sessions {
			last := r.lastClientByte.Load()
			if last == 0 || r.acquiring.Load() {
				continue
			}
			quiet := time.Duration(now - last)
			switch {
			case r.midFrame.Load() && frameTimeout > 0 && quiet > frameTimeout:
				go r.end(endFrameStalled, newClientError(codeProtocolViolation, "frame_timeout", fmt.Sprintf(
					"terminating connection: a message was started and nothing more of it arrived for %s", frameTimeout)))
			case !r.midFrame.Load() && idleTimeout > 0 && quiet > idleTimeout && r.ledger.quiet():
				go r.end(endIdleTimeout, newClientError(codeIdleSessionTimeout, "idle_timeout", fmt.Sprintf(
					"terminating connection due to idle-session timeout (%s, rlsproxy's --client-idle-timeout)", idleTimeout)))
			}
		}
		s.mu.Unlock()
	}
}
