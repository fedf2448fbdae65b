package proxy

// The helpers the internal tests of the package share.

import "github.com/rlsproxy/rlsproxy/session"

// testPolicy is the claims policy of the internal tests: request.jwt.claims and jwt.claims.*.
var testPolicy = session.Policy{ClaimsSetting: "request.jwt.claims", ClaimPrefix: "jwt.claims."}
