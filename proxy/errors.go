package proxy

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/auth"
	"github.com/rlsproxy/rlsproxy/guard"
	"github.com/rlsproxy/rlsproxy/session"
)

// SQLSTATEs the proxy sends itself.
const (
	codeInvalidPassword       = "28P01"
	codeInvalidAuthorization  = "28000"
	codeCannotConnectNow      = "57P03"
	codeAdminShutdown         = "57P01"
	codeTooManyConnections    = "53300"
	codeProtocolViolation     = "08P01"
	codeConnectionFailure     = "08006"
	codeUnableToConnect       = "08001"
	codeInsufficientPrivilege = "42501"
	codeInvalidDatabase       = "3D000"
	codeFeatureNotSupported   = "0A000"
	codeRejectedConnection    = "08004"
	codeProgramLimitExceeded  = "54000"
	codeSyntaxError           = "42601"
	codeInvalidStatementName  = "26000"
	codeIdleSessionTimeout    = "57P05"
)

// clientError is an error the client should read, with its SQLSTATE.
type clientError struct {
	code   string
	msg    string
	detail string
	// reason labels the failure in metrics.
	reason string
}

func (e *clientError) Error() string { return e.msg }

func newClientError(code, reason, msg string) *clientError {
	return &clientError{code: code, msg: msg, reason: reason}
}

// toClientError maps any failure of a session to what the client is told.
// This is the one place where errors become SQLSTATEs.
func toClientError(err error) *clientError {
	var ce *clientError
	if errors.As(err, &ce) {
		return ce
	}
	var gr *guard.Rejection
	if errors.As(err, &gr) {
		code := codeInsufficientPrivilege
		switch gr.Kind {
		case guard.Unreadable:
			code = codeSyntaxError
		case guard.TooCostly:
			code = codeProgramLimitExceeded
		}
		return &clientError{code: code, msg: gr.Msg, reason: gr.Rule}
	}
	var ae *auth.Error
	if errors.As(err, &ae) {
		switch ae.Kind {
		case auth.NotAllowed:
			return &clientError{code: codeInvalidAuthorization, msg: ae.Msg, reason: ae.Reason}
		case auth.Unavailable:
			return &clientError{code: codeCannotConnectNow, msg: ae.Msg, reason: ae.Reason}
		default:
			return &clientError{code: codeInvalidPassword, msg: ae.Msg, reason: ae.Reason}
		}
	}
	if errors.Is(err, session.ErrPoolExhausted) {
		return &clientError{code: codeTooManyConnections, msg: "rlsproxy: " + err.Error(), reason: "pool_exhausted"}
	}
	if errors.Is(err, session.ErrNoRole) {
		return &clientError{code: codeInvalidAuthorization, msg: err.Error(), reason: "no_role"}
	}
	var se *session.OpenError
	if errors.As(err, &se) {
		ce := &clientError{code: codeUnableToConnect, msg: se.Error(), reason: "upstream_connect"}
		switch {
		case errors.Is(err, session.ErrPlantedSettings):
			ce.code, ce.reason = codeConnectionFailure, "upstream_planted_settings"
		case errors.Is(err, session.ErrLoginPassword):
			ce.reason = "upstream_login_password"
		case se.Stage == session.StageInstall:
			ce.code, ce.reason = codeConnectionFailure, "upstream_setup"
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			ce.detail = pgErr.Detail
			// The server's own refusals keep their meaning for the client:
			// a full database is 53300 to retry later, one starting or
			// stopping 57P03; a refused service login is the operator's.
			switch pgErr.Code {
			case "53300":
				ce.code, ce.reason = codeTooManyConnections, "upstream_full"
			case "57P03":
				ce.code, ce.reason = codeCannotConnectNow, "upstream_unavailable"
			case "28P01", "28000":
				if ce.reason == "upstream_connect" {
					ce.reason = "upstream_login_refused"
					ce.msg = "rlsproxy could not log in to the database (" + pgErr.Message + "): its operator must check the --upstream credentials; your token was fine"
				}
			}
		}
		return ce
	}
	return &clientError{code: codeConnectionFailure, msg: "rlsproxy: " + err.Error(), reason: "internal"}
}

// encodeError renders an ErrorResponse with the given severity.
func encodeError(dst []byte, severity string, e *clientError) []byte {
	out, _ := (&pgproto3.ErrorResponse{
		Severity:            severity,
		SeverityUnlocalized: severity,
		Code:                e.code,
		Message:             e.msg,
		Detail:              e.detail,
	}).Encode(dst)
	return out
}
