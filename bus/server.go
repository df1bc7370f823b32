// Package bus is rbee's NATS plumbing: the embedded server, connections,
// the streams and buckets of the contract, job events and heartbeats.
package bus

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rs/zerolog"
)

// DefaultPort is where a local queen's embedded bus listens unless told
// otherwise; it is the standard NATS port so `nats` tools find it as is.
const DefaultPort = 4222

// ErrCredentialsRequired is returned when an embedded server would listen on
// a non-loopback address without credentials.
var ErrCredentialsRequired = errors.New("listening beyond loopback requires credentials")

// ErrTLSRequired is returned when an embedded server would listen on a
// non-loopback address in plain TCP: credentials and tokens would cross
// the network readable.
var ErrTLSRequired = errors.New("listening beyond loopback requires TLS")

// ErrRefused is returned when the bus refuses a connection's credentials
// (unknown, revoked, or none where some are needed).
var ErrRefused = errors.New("credentials refused")

// Credentials say who a connection is. An rbee credential is a key file
// (KeyFile, what `rbee creds` issues): the connection signs the server's
// nonce with it and receives its replies on the key's own inbox prefix. A
// token, or a user and password, is for an external NATS configured by
// hand. Empty means no authentication.
type Credentials struct {
	KeyFile  string
	Token    string
	User     string
	Password string
	// CAFile verifies the server's TLS certificate (a tls:// URL); it
	// travels with the key file.
	CAFile string
}

// Empty reports whether no credential is set.
func (c Credentials) Empty() bool { return c.Token == "" && c.User == "" && c.KeyFile == "" }

// Describe names the credentials for a message, never their secret.
func (c Credentials) Describe() string {
	switch {
	case c.KeyFile != "":
		return "the credentials in " + c.KeyFile
	case c.Token != "":
		return "a token (--nats-token)"
	case c.User != "":
		return fmt.Sprintf("user %q (--nats-user)", c.User)
	}
	return "no credentials"
}

// Options returns the nats.go options that present these credentials.
func (c Credentials) Options() ([]nats.Option, error) {
	var opts []nats.Option
	switch {
	case c.KeyFile != "":
		kp, err := auth.ReadKeyFile(c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("%w: reading the credentials %s: %v", ErrRefused, c.KeyFile, err)
		}
		pub, err := kp.PublicKey()
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Nkey(pub, kp.Sign), nats.CustomInboxPrefix(auth.InboxPrefix(pub)))
	case c.Token != "":
		opts = append(opts, nats.Token(c.Token))
	case c.User != "":
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	}
	var ca []byte
	switch {
	case c.CAFile != "":
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("the bus's CA certificate: %w", err)
		}
		ca = pem
	case c.KeyFile != "":
		ca = auth.KeyFileCA(c.KeyFile)
	}
	if ca != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("the bus's CA certificate (%s) holds no certificate", c.Describe())
		}
		// TLS whenever the server asks for it, verified against this CA;
		// Connect insists on it beyond loopback.
		opts = append(opts, func(o *nats.Options) error {
			o.TLSConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
			return nil
		})
	}
	return opts, nil
}

// ServerConfig configures an embedded nats-server.
type ServerConfig struct {
	// DataDir holds JetStream's files (under DataDir/jetstream).
	DataDir string
	// Listen is host:port for TCP clients. Empty means 127.0.0.1:DefaultPort.
	// "-" means no TCP listener at all: in-process clients only.
	Listen      string
	Credentials Credentials
	// Authority, when set, is the only way in: every connection must
	// present an rbee credential it knows, and gets that role's
	// permissions (Credentials, a token or a user, is then not used).
	Authority *auth.Authority
	// TLS, when set, is required of every TCP client.
	TLS *tls.Config
	// ServerName names the server in logs and monitoring.
	ServerName string
	Log        zerolog.Logger
}

// Server is an embedded nats-server with JetStream.
type Server struct {
	srv *server.Server
	cfg ServerConfig
}

// StartServer starts an embedded nats-server with JetStream on file storage
// and waits until it accepts clients. Listening on any address but loopback
// without credentials is refused: a bus that runs inference and starts
// processes must not be open to the network.
func StartServer(cfg ServerConfig) (*Server, error) {
	opts := &server.Options{
		ServerName:         cfg.ServerName,
		JetStream:          true,
		StoreDir:           filepath.Join(cfg.DataDir, "jetstream"),
		NoSigs:             true,
		MaxPayload:         8 << 20,
		JetStreamMaxMemory: 256 << 20,
	}
	if opts.ServerName == "" {
		opts.ServerName = "rbee-queen"
	}
	switch cfg.Listen {
	case "-":
		opts.DontListen = true
	default:
		listen := cfg.Listen
		if listen == "" {
			listen = net.JoinHostPort("127.0.0.1", strconv.Itoa(DefaultPort))
		}
		host, portStr, err := net.SplitHostPort(listen)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: %w", listen, err)
		}
		port, err := strconv.Atoi(portStr)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: port %q is not a number", listen, portStr)
		}
		if !isLoopback(host) && cfg.Authority == nil && cfg.Credentials.Empty() {
			return nil, fmt.Errorf("%w: set a token (--nats-token or RBEE_NATS_TOKEN) or a user and password to listen on %s", ErrCredentialsRequired, listen)
		}
		if !isLoopback(host) && cfg.TLS == nil {
			return nil, fmt.Errorf("%w: listening on %s", ErrTLSRequired, listen)
		}
		opts.Host, opts.Port = host, port
	}
	if cfg.TLS != nil {
		opts.TLSConfig = cfg.TLS
		opts.TLS, opts.TLSVerify = true, false
		opts.TLSTimeout = 2
	}
	switch {
	case cfg.Authority != nil:
		opts.CustomClientAuthentication = cfg.Authority
		opts.AlwaysEnableNonce = true
	case cfg.Credentials.Token != "":
		opts.Authorization = cfg.Credentials.Token
	case cfg.Credentials.User != "":
		opts.Username, opts.Password = cfg.Credentials.User, cfg.Credentials.Password
	}
	if err := os.MkdirAll(opts.StoreDir, 0o700); err != nil {
		return nil, fmt.Errorf("create JetStream directory: %w", err)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("configure embedded NATS server: %w", err)
	}
	srv.SetLoggerV2(&serverLog{log: cfg.Log}, false, false, false)
	if cfg.Authority != nil {
		cfg.Authority.Attach(srv)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not become ready on %s within 10s (is the port in use?)", cfg.Listen)
	}
	return &Server{srv: srv, cfg: cfg}, nil
}

// IsLoopback reports whether host (a name or an address) is this machine's
// loopback.
func IsLoopback(host string) bool { return isLoopback(host) }

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ClientURL is the URL TCP clients use, or "" when the server does not listen.
func (s *Server) ClientURL() string {
	if s.srv.Addr() == nil {
		return ""
	}
	return s.srv.ClientURL()
}

// InProcessOptions returns the options for a client inside this process; it
// needs no socket. Its credentials are the ConnectConfig's.
func (s *Server) InProcessOptions() []nats.Option {
	return []nats.Option{nats.InProcessServer(s.srv)}
}

// Shutdown stops the server and waits until it has.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
}

// serverLog forwards nats-server's log to zerolog at matching levels.
type serverLog struct{ log zerolog.Logger }

func (l *serverLog) Noticef(format string, v ...any) { l.log.Debug().Msgf(format, v...) }
func (l *serverLog) Warnf(format string, v ...any)   { l.log.Warn().Msgf(format, v...) }
func (l *serverLog) Fatalf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l *serverLog) Errorf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l *serverLog) Debugf(format string, v ...any)  { l.log.Trace().Msgf(format, v...) }
func (l *serverLog) Tracef(format string, v ...any)  { l.log.Trace().Msgf(format, v...) }
