package auth

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Rules are the checks a token's claims must pass once its signature is good.
// This file is where every claim rule lives.
type Rules struct {
	// Issuer is the exact expected iss.
	Issuer string
	// Cognito applies the rules of Cognito user pools: token_use is required,
	// access tokens carry client_id, id tokens carry aud.
	Cognito bool
	// TokenUse is "access", "id" or "any".
	TokenUse string
	// ClientIDs are the accepted app clients (client_id of access tokens, aud
	// of id tokens; for other issuers client_id, azp or aud).
	ClientIDs []string
	// Audiences are accepted aud values, for issuers other than Cognito.
	Audiences []string
	// Leeway is the clock skew allowed on exp, nbf and iat.
	Leeway time.Duration
}

// Check applies the rules to verified claims at time now.
func (r Rules) Check(claims map[string]any, now time.Time) (*Identity, error) {
	iss, _ := claims["iss"].(string)
	if strings.TrimSuffix(iss, "/") != strings.TrimSuffix(r.Issuer, "/") {
		return nil, invalid("issuer", fmt.Sprintf("token was not issued by %s", r.Issuer))
	}

	exp, err := r.checkTimes(claims, now)
	if err != nil {
		return nil, err
	}

	sub, _ := claims["sub"].(string)
	if sub == "" {
		return nil, invalid("malformed", "token has no sub claim")
	}

	if err := r.checkUseAndClient(claims); err != nil {
		return nil, err
	}
	return newIdentity(claims, sub, exp)
}

// checkTimes applies exp, nbf and iat with the leeway at now, and returns exp.
// It is cheap, so a cached identity is checked again on every use.
func (r Rules) checkTimes(claims map[string]any, now time.Time) (time.Time, error) {
	exp, ok, err := numericDate(claims, "exp")
	if err != nil {
		return time.Time{}, err
	}
	if !ok {
		return time.Time{}, invalid("malformed", "token has no exp claim")
	}
	if now.After(exp.Add(r.Leeway)) {
		return time.Time{}, invalid("expired", "token expired at "+exp.UTC().Format(time.RFC3339))
	}
	if nbf, ok, err := numericDate(claims, "nbf"); err != nil {
		return time.Time{}, err
	} else if ok && now.Add(r.Leeway).Before(nbf) {
		return time.Time{}, invalid("not_yet_valid", "token is not valid before "+nbf.UTC().Format(time.RFC3339))
	}
	if iat, ok, err := numericDate(claims, "iat"); err != nil {
		return time.Time{}, err
	} else if ok && now.Add(r.Leeway).Before(iat) {
		return time.Time{}, invalid("issued_in_future", "token was issued in the future, at "+iat.UTC().Format(time.RFC3339)+": check the clocks of the issuer and the proxy")
	}
	return exp, nil
}

func (r Rules) checkUseAndClient(claims map[string]any) error {
	use, _ := claims["token_use"].(string)
	if r.Cognito {
		if use != "access" && use != "id" {
			return invalid("malformed", "token has no token_use of access or id: not a Cognito user pool token")
		}
	}
	if use != "" && r.TokenUse != "" && r.TokenUse != "any" && use != r.TokenUse {
		return notAllowed("token_use", fmt.Sprintf("token_use %s is not accepted: send the %s token", use, r.TokenUse))
	}

	aud := stringList(claims["aud"])
	if r.Cognito {
		if len(r.ClientIDs) == 0 {
			return nil
		}
		switch use {
		case "access":
			if id, _ := claims["client_id"].(string); !slices.Contains(r.ClientIDs, id) {
				return notAllowed("client", "token was issued to an app client that is not in --client-id")
			}
		case "id":
			if !intersects(aud, r.ClientIDs) {
				return notAllowed("client", "token audience is not an app client in --client-id")
			}
		}
		return nil
	}

	if len(r.ClientIDs) > 0 {
		ids := append(stringList(claims["client_id"]), stringList(claims["azp"])...)
		if !intersects(append(ids, aud...), r.ClientIDs) {
			return notAllowed("client", "token was issued to a client that is not in --client-id")
		}
	}
	if len(r.Audiences) > 0 && !intersects(aud, r.Audiences) {
		return notAllowed("audience", "token audience is not in --audience")
	}
	return nil
}

// numericDate reads a JWT NumericDate claim (seconds since the epoch, possibly
// fractional).
func numericDate(claims map[string]any, name string) (time.Time, bool, error) {
	v, ok := claims[name]
	if !ok {
		return time.Time{}, false, nil
	}
	var f float64
	switch n := v.(type) {
	case json.Number:
		var err error
		if f, err = n.Float64(); err != nil {
			return time.Time{}, false, invalid("malformed", "token claim "+name+" is not a number")
		}
	case float64:
		f = n
	default:
		return time.Time{}, false, invalid("malformed", "token claim "+name+" is not a number")
	}
	if math.IsNaN(f) || math.IsInf(f, 0) || f < 0 || f > 1e11 {
		return time.Time{}, false, invalid("malformed", "token claim "+name+" is out of range")
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true, nil
}

// stringList reads a claim that may be a string or an array of strings.
func stringList(v any) []string {
	switch t := v.(type) {
	case string:
		return []string{t}
	case []any:
		out := make([]string, 0, len(t))
		for _, e := range t {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func intersects(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}
