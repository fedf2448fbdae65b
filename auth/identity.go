package auth

import (
	"encoding/json"
	"time"
)

// Identity is what a verified token says about its holder.
type Identity struct {
	Subject   string
	ExpiresAt time.Time
	// Claims are the token's claims; numbers are json.Number so that they keep
	// their exact text.
	Claims map[string]any
	// ClaimsJSON is Claims as compact JSON with sorted keys. A string, made
	// once per token: the sessions of a cached token share it, and
	// comparing theirs is comparing one pointer.
	ClaimsJSON string
	// keyID is the kid of the key that verified the token.
	keyID string
}

func newIdentity(claims map[string]any, sub string, exp time.Time) (*Identity, error) {
	js, err := json.Marshal(claims)
	if err != nil {
		return nil, err
	}
	return &Identity{Subject: sub, ExpiresAt: exp, Claims: claims, ClaimsJSON: string(js)}, nil
}
