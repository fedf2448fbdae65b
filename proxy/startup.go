package proxy

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rlsproxy/rlsproxy/internal/wire"
	"github.com/rlsproxy/rlsproxy/session"
)

// Startup-phase request codes (the first four bytes of the packet body).
const (
	codeSSLRequest    = 80877103
	codeGSSENCRequest = 80877104
	codeCancelRequest = 80877102
	protocol30        = 3 << 16
)

// Limits of the startup packet, as in PostgreSQL (MAX_STARTUP_PACKET_LENGTH).
const (
	minStartupLen = 8
	maxStartupLen = 10000
)

// clientConn is a client connection during startup: the socket (TLS once
// negotiated) and a reader whose buffered bytes carry on into the relay.
type clientConn struct {
	net.Conn
	r     *wire.Reader
	tls   bool
	local bool // loopback TCP or unix socket: no one else can read the traffic
}

// startupRequest is what the client asked for in its StartupMessage.
type startupRequest struct {
	user, database  string
	applicationName string
	// params are forwarded upstream.
	params map[string]string
	// encodings are the client_encoding values asked for, as a parameter
	// or in options.
	encodings []string
	// unsupportedOptions are _pq_ protocol options, refused by negotiation.
	unsupportedOptions []string
	minor              uint16
}

// cancelRequest is a CancelRequest packet.
type cancelRequest struct {
	pid    uint32
	secret []byte
	// fromPeer: forwarded by another instance (codePeerCancel), never
	// forwarded again.
	fromPeer bool
}

// errDropped marks failures where PostgreSQL closes the socket without a
// word: the client went away or stalled, sent a startup packet of impossible
// length, failed the TLS handshake, or sent plaintext after SSLRequest.
var errDropped = errors.New("connection dropped")

// dropUnlessSpoken marks err as a silent drop unless it is meant for the client.
func dropUnlessSpoken(err error) error {
	var ce *clientError
	if err == nil || errors.As(err, &ce) {
		return err
	}
	return fmt.Errorf("%w: %w", errDropped, err)
}

// readStartup runs the startup negotiation up to the StartupMessage: SSL and
// GSSAPI encryption requests, and CancelRequest. It returns either a
// startupRequest or a cancelRequest.
func readStartup(c *clientConn, tlsConfig *tls.Config, p session.Policy) (req *startupRequest, cancel *cancelRequest, err error) {
	defer func() { err = dropUnlessSpoken(err) }()
	for {
		body, err := c.r.ReadStartup(minStartupLen, maxStartupLen)
		if err != nil {
			return nil, nil, err
		}
		code := binary.BigEndian.Uint32(body)
		switch {
		case code == codeSSLRequest:
			if tlsConfig == nil || c.tls {
				if _, err := c.Write([]byte{'N'}); err != nil {
					return nil, nil, err
				}
				continue
			}
			if len(c.r.Buffered()) > 0 {
				// Bytes sent after SSLRequest but before the handshake could
				// be injected by a man in the middle (CVE-2021-23214).
				return nil, nil, errors.New("received unencrypted data after SSL request")
			}
			if _, err := c.Write([]byte{'S'}); err != nil {
				return nil, nil, err
			}
			tc := tls.Server(c.Conn, tlsConfig)
			if err := tc.Handshake(); err != nil {
				return nil, nil, fmt.Errorf("TLS handshake: %w", err)
			}
			c.Conn, c.tls = tc, true
			c.r.Reset(tc)
		case code == codeGSSENCRequest:
			if _, err := c.Write([]byte{'N'}); err != nil {
				return nil, nil, err
			}
		case code == codeCancelRequest, code == codePeerCancel:
			var cr pgproto3.CancelRequest
			if cancelBody := body; code == codePeerCancel {
				// Decode checks the code: give it PostgreSQL's.
				body = binary.BigEndian.AppendUint32(nil, codeCancelRequest)
				body = append(body, cancelBody[4:]...)
			}
			if err := cr.Decode(body); err != nil {
				return nil, nil, err
			}
			return nil, &cancelRequest{pid: cr.ProcessID, secret: cr.SecretKey, fromPeer: code == codePeerCancel}, nil
		case code>>16 == 3:
			req, err := parseStartup(body, p)
			return req, nil, err
		default:
			return nil, nil, newClientError(codeFeatureNotSupported, "protocol",
				fmt.Sprintf("unsupported frontend protocol %d.%d: rlsproxy speaks 3.0", code>>16, code&0xffff))
		}
	}
}

// parseStartup decodes a protocol 3.x StartupMessage and sorts its parameters
// into what is forwarded and what is refused.
func parseStartup(body []byte, p session.Policy) (*startupRequest, error) {
	req := &startupRequest{minor: uint16(binary.BigEndian.Uint32(body) & 0xffff), params: map[string]string{}}
	rest := body[4:]
	for len(rest) > 0 && rest[0] != 0 {
		k, v, tail, ok := cutPair(rest)
		if !ok {
			return nil, newClientError(codeProtocolViolation, "protocol", "invalid startup packet layout: expected terminator as last byte")
		}
		rest = tail
		switch {
		case k == "user":
			req.user = v
		case k == "database":
			req.database = v
		case k == "replication":
			return nil, newClientError(codeInsufficientPrivilege, "replication", "replication connections are not allowed through rlsproxy")
		case strings.HasPrefix(k, "_pq_."):
			req.unsupportedOptions = append(req.unsupportedOptions, k)
		case k == "options":
			encodings, err := checkOptions(v, p)
			if err != nil {
				return nil, err
			}
			req.encodings = append(req.encodings, encodings...)
			req.params[k] = v
		case p.Protected(k):
			return nil, newClientError(codeInsufficientPrivilege, "protected_setting",
				fmt.Sprintf("startup parameter %q is not allowed through rlsproxy: it sets the identity of the session", k))
		default:
			switch strings.ToLower(k) { // setting names fold case
			case "application_name":
				req.applicationName = v
			case "client_encoding":
				req.encodings = append(req.encodings, v)
			}
			req.params[k] = v
		}
	}
	if req.user == "" {
		return nil, newClientError(codeInvalidAuthorization, "protocol", "no user name specified in startup packet")
	}
	if req.database == "" {
		req.database = req.user
	}
	return req, nil
}

func cutPair(b []byte) (k, v string, rest []byte, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", "", nil, false
	}
	j := bytes.IndexByte(b[i+1:], 0)
	if j < 0 {
		return "", "", nil, false
	}
	return string(b[:i]), string(b[i+1 : i+1+j]), b[i+2+j:], true
}

// checkOptions refuses startup options that set identity settings, and
// returns the client_encoding values they set. options holds command-line
// switches for the backend (-c name=value, --name=value), split on unescaped
// spaces as pg_split_opts does.
func checkOptions(options string, p session.Policy) (encodings []string, err error) {
	args := splitOptions(options)
	for i := 0; i < len(args); i++ {
		a := args[i]
		var setting string
		switch {
		case a == "-c" && i+1 < len(args):
			i++
			setting = args[i]
		case strings.HasPrefix(a, "-c"):
			setting = a[2:]
		case strings.HasPrefix(a, "--"):
			setting = a[2:]
		default:
			return nil, newClientError(codeInsufficientPrivilege, "protected_setting",
				fmt.Sprintf("startup option %q is not allowed through rlsproxy: only -c name=value settings are", a))
		}
		name, value, found := strings.Cut(setting, "=")
		if !found || name == "" {
			return nil, newClientError(codeProtocolViolation, "protocol", fmt.Sprintf("startup option %q is not name=value", a))
		}
		// PostgreSQL reads dashes in option names as underscores.
		name = strings.ReplaceAll(name, "-", "_")
		if p.Protected(name) {
			return nil, newClientError(codeInsufficientPrivilege, "protected_setting",
				fmt.Sprintf("startup option setting %q is not allowed through rlsproxy: it sets the identity of the session", name))
		}
		if strings.EqualFold(name, "client_encoding") {
			encodings = append(encodings, value)
		}
	}
	return encodings, nil
}

func splitOptions(s string) []string {
	var out []string
	var cur strings.Builder
	inArg := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inArg = true
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			if inArg {
				out = append(out, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteByte(c)
			inArg = true
		}
	}
	if inArg {
		out = append(out, cur.String())
	}
	return out
}

// readPassword asks for a cleartext password and returns it.
func readPassword(c *clientConn, maxLen int) (_ string, err error) {
	defer func() { err = dropUnlessSpoken(err) }()
	msg, _ := (&pgproto3.AuthenticationCleartextPassword{}).Encode(nil)
	if _, err := c.Write(msg); err != nil {
		return "", err
	}
	for {
		typ, size, complete, ok, err := c.r.Peek()
		if err != nil {
			return "", err
		}
		if ok && size > maxLen+wire.HeaderLen+1 {
			return "", newClientError(codeInvalidPassword, "too_large", fmt.Sprintf("token is larger than %d bytes", maxLen))
		}
		if ok && typ != 'p' {
			return "", newClientError(codeProtocolViolation, "protocol", fmt.Sprintf("expected password response, got message type %q", typ))
		}
		if complete {
			break
		}
		if err := c.r.Fill(); err != nil {
			return "", err
		}
	}
	_, body, err := c.r.ReadMessage()
	if err != nil {
		return "", err
	}
	pw, _, ok := bytes.Cut(body, []byte{0})
	if !ok {
		return "", newClientError(codeProtocolViolation, "protocol", "invalid password packet")
	}
	return string(pw), nil
}
