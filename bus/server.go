// Package bus is rbee's NATS plumbing: the embedded server, connections,
// the streams and buckets of the contract, job events and heartbeats.
package bus

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
	// NkeyUsers, when set, are the public keys of the only users this
	// server accepts: each connection proves its key by signing the
	// server's nonce. A hive's leaf uses it to let in only the holder of
	// the hive's key (see LeafRemote).
	NkeyUsers []string
	// Leaf, when set, makes this server a leaf node of a hub that it dials
	// out to: one outbound connection carries all its clients' traffic,
	// so a machine behind NAT needs no inbound port. Such a server has no
	// JetStream of its own (DataDir is not used): its clients' JetStream
	// API requests, KV writes and watches, stream and work-queue consumers
	// and acknowledgements all reach the hub's JetStream over the leaf
	// connection.
	Leaf *LeafRemote
	// LeafListen, when set, is host:port where this server accepts leaf
	// nodes (a hub's side; not with an Authority); port -1 picks a free
	// one. Beyond loopback it
	// needs TLS and credentials, as Listen does. A leaf authenticates like
	// a client (a token, a user, or an nkey of the global authorization)
	// and the user's permissions hold for everything it sends and asks
	// to receive.
	LeafListen string
	Log        zerolog.Logger
}

// LeafRemote is the hub a leaf node joins.
type LeafRemote struct {
	// URLs are the hub's leaf-node listeners (nats-leaf://, nats:// or
	// tls://host:7422; a token or a user may travel in the URL). The leaf
	// dials them in turn and redials for ever while the link is down; it
	// uses these only, never the listeners the hub advertises, so list
	// every node of a hub cluster.
	URLs []string
	// Credentials authenticate the leaf connection: KeyFile's nkey signs
	// the hub's nonce (on a hub configured from `rbee creds
	// server-config`, the hive's user, whose permissions also cover its
	// workers); CAFile verifies the hub's TLS certificate.
	Credentials Credentials
	// ReconnectInterval is the pause between dials while the link is down
	// (default DefaultLeafReconnect).
	ReconnectInterval time.Duration
}

// DefaultLeafReconnect is how long a leaf waits between dials to a hub it
// lost: short, so a link that comes back after a cut is used within a
// fraction of a heartbeat TTL.
const DefaultLeafReconnect = 250 * time.Millisecond

// Server is an embedded nats-server with JetStream.
type Server struct {
	srv  *server.Server
	cfg  ServerConfig
	opts *server.Options
}

// Interest reports whether a message published on subject in this
// server's account would reach a subscriber: its own, or one that a route
// or leaf connection told it of.
func (s *Server) Interest(subject string) bool {
	return s.srv.GlobalAccount().SubscriptionInterest(subject)
}

// StartServer starts an embedded nats-server with JetStream on file storage
// and waits until it accepts clients. Listening on any address but loopback
// without credentials is refused: a bus that runs inference and starts
// processes must not be open to the network.
func StartServer(cfg ServerConfig) (*Server, error) {
	opts := &server.Options{
		ServerName:         cfg.ServerName,
		JetStream:          cfg.Leaf == nil,
		NoSigs:             true,
		MaxPayload:         8 << 20,
		JetStreamMaxMemory: 256 << 20,
	}
	if opts.JetStream {
		opts.StoreDir = filepath.Join(cfg.DataDir, "jetstream")
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
		host, port, err := splitListen(listen)
		if err != nil {
			return nil, fmt.Errorf("listen address: %w", err)
		}
		if !isLoopback(host) && cfg.Authority == nil && cfg.Credentials.Empty() {
			return nil, fmt.Errorf("%w: set a token (--nats-token or RBEE_NATS_TOKEN) or a user and password to listen on %s", ErrCredentialsRequired, listen)
		}
		if !isLoopback(host) && cfg.TLS == nil {
			return nil, fmt.Errorf("%w: listening on %s", ErrTLSRequired, listen)
		}
		opts.Host, opts.Port = host, port
	}
	if cfg.LeafListen != "" {
		if cfg.Authority != nil {
			// The authority vets client connections; a leaf it let in
			// would get no account and no permissions of a role. Hives
			// behind NAT join an external hub instead.
			return nil, errors.New("an embedded bus with an authority does not accept leaf nodes")
		}
		host, port, err := splitListen(cfg.LeafListen)
		if err != nil {
			return nil, fmt.Errorf("leaf listen address: %w", err)
		}
		if !isLoopback(host) && cfg.Authority == nil && cfg.Credentials.Empty() && len(cfg.NkeyUsers) == 0 {
			return nil, fmt.Errorf("%w: to accept leaf nodes on %s", ErrCredentialsRequired, cfg.LeafListen)
		}
		if !isLoopback(host) && cfg.TLS == nil {
			return nil, fmt.Errorf("%w: accepting leaf nodes on %s", ErrTLSRequired, cfg.LeafListen)
		}
		opts.LeafNode.Host, opts.LeafNode.Port = host, port
		opts.JsAccDefaultDomain = map[string]string{server.DEFAULT_GLOBAL_ACCOUNT: ""}
		if cfg.TLS != nil {
			opts.LeafNode.TLSConfig = cfg.TLS
			opts.LeafNode.TLSTimeout = 2
		}
	}
	if cfg.Leaf != nil {
		remote, err := cfg.Leaf.options()
		if err != nil {
			return nil, err
		}
		opts.LeafNode.Remotes = []*server.RemoteLeafOpts{remote}
		// JetStream is the hub's, in its default (empty) domain: without
		// this nats-server denies $JS.API.>, $KV.> and $OBJ.> across a
		// leaf connection of a non-system account, so that two
		// JetStreams do not answer one request. This leaf has none.
		opts.JsAccDefaultDomain = map[string]string{server.DEFAULT_GLOBAL_ACCOUNT: ""}
		opts.LeafNode.ReconnectInterval = cfg.Leaf.ReconnectInterval
		if opts.LeafNode.ReconnectInterval <= 0 {
			opts.LeafNode.ReconnectInterval = DefaultLeafReconnect
		}
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
	case len(cfg.NkeyUsers) > 0:
		for _, pub := range cfg.NkeyUsers {
			opts.Nkeys = append(opts.Nkeys, &server.NkeyUser{Nkey: pub})
		}
	case cfg.Credentials.Token != "":
		opts.Authorization = cfg.Credentials.Token
	case cfg.Credentials.User != "":
		opts.Username, opts.Password = cfg.Credentials.User, cfg.Credentials.Password
	}
	if opts.JetStream {
		if err := os.MkdirAll(opts.StoreDir, 0o700); err != nil {
			return nil, fmt.Errorf("create JetStream directory: %w", err)
		}
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
	return &Server{srv: srv, cfg: cfg, opts: opts}, nil
}

// options are the nats-server remote options that dial the hub.
func (l *LeafRemote) options() (*server.RemoteLeafOpts, error) {
	if len(l.URLs) == 0 {
		return nil, errors.New("a leaf node needs the URL of its hub's leaf-node listener")
	}
	// Only the URLs given: a hub advertises its leaf listeners as it sees
	// them (private addresses, the far side of a proxy), which a leaf
	// behind NAT may not reach, or must not use.
	remote := &server.RemoteLeafOpts{IgnoreDiscoveredServers: true}
	secure := false
	for _, raw := range l.URLs {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("hub URL %q: want nats-leaf://HOST:PORT, nats://… or tls://…", raw)
		}
		secure = secure || u.Scheme == "tls"
		if u.Port() == "" {
			u.Host = net.JoinHostPort(u.Hostname(), "7422")
		}
		// A hub set up by hand (a token, a user) reads them from the URL.
		if u.User == nil {
			switch cr := l.Credentials; {
			case cr.KeyFile != "":
			case cr.Token != "":
				u.User = url.User(cr.Token)
			case cr.User != "":
				u.User = url.UserPassword(cr.User, cr.Password)
			}
		}
		remote.URLs = append(remote.URLs, u)
	}
	cr := l.Credentials
	if cr.KeyFile != "" {
		kp, err := auth.ReadKeyFile(cr.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("%w: reading the credentials %s: %v", ErrRefused, cr.KeyFile, err)
		}
		// nats-server's remote takes the seed itself and signs the hub's
		// nonce with it (a SignatureCB would be sent as a JWT user, which
		// a hub of plain nkey users does not know).
		seed, err := kp.Seed()
		if err != nil {
			return nil, fmt.Errorf("%w: the credentials %s hold no seed: %v", ErrRefused, cr.KeyFile, err)
		}
		remote.Nkey = string(seed)
	}
	// TLS is set up where asked for (a tls:// URL, a CA given): the
	// remote's TLS configuration forces TLS, so the CA that travels in a
	// key file is not enough to ask for it on a plain hub (tests on
	// loopback).
	if cr.CAFile != "" {
		secure = true
	}
	if secure {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		ca := auth.KeyFileCA(cr.KeyFile)
		if cr.CAFile != "" {
			pem, err := os.ReadFile(cr.CAFile)
			if err != nil {
				return nil, fmt.Errorf("the hub's CA certificate: %w", err)
			}
			ca = pem
		}
		if ca != nil {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(ca) {
				return nil, fmt.Errorf("the hub's CA certificate (%s) holds no certificate", cr.Describe())
			}
			cfg.RootCAs = pool
		}
		remote.TLS, remote.TLSConfig, remote.TLSTimeout = true, cfg, 2
	}
	return remote, nil
}

// splitListen reads host:port, port -1 meaning any free port.
func splitListen(listen string) (string, int, error) {
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return "", 0, fmt.Errorf("%q: %w", listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return "", 0, fmt.Errorf("%q: port %q is not a number", listen, portStr)
	}
	return host, port, nil
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

// LeafURL is the URL leaf nodes dial to join this server, or "" when it
// accepts none (ServerConfig.LeafListen).
func (s *Server) LeafURL() string {
	if s.cfg.LeafListen == "" {
		return ""
	}
	// nats-server wrote the port it bound back into its options.
	return fmt.Sprintf("nats-leaf://%s", net.JoinHostPort(s.opts.LeafNode.Host, strconv.Itoa(s.opts.LeafNode.Port)))
}

// LeafConnections is how many leaf connections the server holds: on a
// leaf, 1 while the link to its hub is up.
func (s *Server) LeafConnections() int { return s.srv.NumLeafNodes() }

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
