package proxy

import (
	"sync"
	"time"
)

// refusalLog bounds the lines logged about refused connections: at most one
// a minute per client address and reason, carrying how many were refused
// since the last one, so that 10,000 bad tokens cost a line, not 10,000.
type refusalLog struct {
	mu      sync.Mutex
	entries map[refusalKey]*refusalEntry
}

type refusalKey struct{ peer, reason string }

type refusalEntry struct {
	logged     time.Time
	suppressed int
}

const (
	refusalLogEvery = time.Minute
	// maxRefusalEntries bounds the addresses remembered: past it, those not
	// logged within the last minute are forgotten.
	maxRefusalEntries = 10000
)

// allow reports whether to log a refusal of peer for reason now, and how
// many were not logged since the last line.
func (l *refusalLog) allow(peer, reason string, now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.entries == nil {
		l.entries = map[refusalKey]*refusalEntry{}
	}
	k := refusalKey{peer, reason}
	e := l.entries[k]
	if e != nil && now.Sub(e.logged) < refusalLogEvery {
		e.suppressed++
		return false, 0
	}
	if e == nil {
		if len(l.entries) >= maxRefusalEntries {
			for k, old := range l.entries {
				if now.Sub(old.logged) >= refusalLogEvery {
					delete(l.entries, k)
				}
			}
		}
		e = &refusalEntry{}
		l.entries[k] = e
	}
	n := e.suppressed
	e.logged, e.suppressed = now, 0
	return true, n
}
