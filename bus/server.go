// Package bus is rbee's NATS plumbing: the embedded server, connections,
// the streams and buckets of the contract, job events and heartbeats.
package bus

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// DefaultPort is where a local queen's embedded bus listens unless told
// otherwise; it is the standard NATS port so `nats` tools find it as is.
const DefaultPort = 4222

// ErrCredentialsRequired is returned when an embedded server would listen on
// a non-loopback address without credentials.
var ErrCredentialsRequired = errors.New("listening beyond loopback requires credentials")

// Credentials authenticate clients of the bus. A token, or a user and
// password; empty means no authentication (loopback only).
type Credentials struct {
	Token    string
	User     string
	Password string
}

// Empty reports whether no credential is set.
func (c Credentials) Empty() bool { return c.Token == "" && c.User == "" }

// Options returns the nats.go options that present these credentials.
func (c Credentials) Options() []nats.Option {
	switch {
	case c.Token != "":
		return []nats.Option{nats.Token(c.Token)}
	case c.User != "":
		return []nats.Option{nats.UserInfo(c.User, c.Password)}
	}
	return nil
}

// ServerConfig configures an embedded nats-server.
type ServerConfig struct {
	// DataDir holds JetStream's files (under DataDir/jetstream).
	DataDir string
	// Listen is host:port for TCP clients. Empty means 127.0.0.1:DefaultPort.
	// "-" means no TCP listener at all: in-process clients only.
	Listen      string
	Credentials Credentials
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
		if !isLoopback(host) && cfg.Credentials.Empty() {
			return nil, fmt.Errorf("%w: set a token (--nats-token or RBEE_NATS_TOKEN) or a user and password to listen on %s", ErrCredentialsRequired, listen)
		}
		opts.Host, opts.Port = host, port
	}
	switch {
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
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not become ready on %s within 10s (is the port in use?)", cfg.Listen)
	}
	return &Server{srv: srv, cfg: cfg}, nil
}

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
// needs no socket.
func (s *Server) InProcessOptions() []nats.Option {
	return append([]nats.Option{nats.InProcessServer(s.srv)}, s.cfg.Credentials.Options()...)
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
