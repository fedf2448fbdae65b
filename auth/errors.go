package auth

// Kind sorts token rejections by what the client can do about them.
type Kind int

const (
	// Invalid: the token is not a good token of the issuer (bad, expired,
	// forged). The client needs a new token. SQLSTATE 28P01.
	Invalid Kind = iota
	// NotAllowed: the token is genuine but this proxy does not accept it (wrong
	// app client, wrong token_use, no role). SQLSTATE 28000.
	NotAllowed
	// Unavailable: the proxy cannot judge the token right now (issuer keys not
	// loaded). The client may retry. SQLSTATE 57P03.
	Unavailable
)

// Error is a token rejection. Its message is written for the person holding
// the token and never contains the token.
type Error struct {
	Kind   Kind
	Reason string // short, stable label for metrics, e.g. "expired"
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

func invalid(reason, msg string) *Error    { return &Error{Kind: Invalid, Reason: reason, Msg: msg} }
func notAllowed(reason, msg string) *Error { return &Error{Kind: NotAllowed, Reason: reason, Msg: msg} }
