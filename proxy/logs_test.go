package proxy

import (
	"testing"
	"time"
)

func TestRefusalLog(t *testing.T) {
	var l refusalLog
	now := time.Now()
	for i, tc := range []struct {
		peer, reason string
		after        time.Duration
		ok           bool
		suppressed   int
	}{
		{"10.0.0.1", "signature", 0, true, 0},
		{"10.0.0.1", "signature", time.Second, false, 0},
		{"10.0.0.1", "signature", 2 * time.Second, false, 0},
		{"10.0.0.1", "expired", 2 * time.Second, true, 0},   // another reason
		{"10.0.0.2", "signature", 2 * time.Second, true, 0}, // another address
		{"10.0.0.1", "signature", 61 * time.Second, true, 2},
		{"10.0.0.1", "signature", 62 * time.Second, false, 0},
	} {
		ok, n := l.allow(tc.peer, tc.reason, now.Add(tc.after))
		if ok != tc.ok || n != tc.suppressed {
			t.Errorf("%d: allow(%s, %s, +%s) = %v, %d; want %v, %d", i, tc.peer, tc.reason, tc.after, ok, n, tc.ok, tc.suppressed)
		}
	}
}
