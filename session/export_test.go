package session

import "github.com/jackc/pgx/v5/pgconn"

// SetDialFunc makes d dial with f, for tests that slow the socket down.
func SetDialFunc(d *Dialer, f pgconn.DialFunc) { d.config.DialFunc = f }

// NewIdleUpstream returns an Upstream with no connection, for tests of its
// records alone.
func NewIdleUpstream() *Upstream { return &Upstream{} }
