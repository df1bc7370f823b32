// Package keeper is the `rbee` command line: it sends operations to the
// queen and follows jobs' subjects to show narration and stream tokens.
package keeper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
)

// Exit statuses, documented in the README.
const (
	ExitOK          = 0
	ExitFailed      = 1
	ExitUsage       = 2
	ExitUnreachable = 3
	ExitInterrupted = 130
)

// ErrQueenUnreachable means neither a queen nor a bus answered.
var ErrQueenUnreachable = errors.New("queen unreachable")

// ErrBusLost means the bus went away while a job was followed and did not
// come back within --reconnect-timeout. The job may well go on without us.
var ErrBusLost = errors.New("lost the bus")

// DefaultReconnectTimeout is how long a follow waits for a lost bus to come
// back: longer than a queen restart, short enough that a bus gone for good
// is reported.
const DefaultReconnectTimeout = 2 * time.Minute

// Session is one command's connection to the queen. When the command found
// no local queen and started one (ephemeral mode), Close stops it again.
type Session struct {
	Bus       *bus.Bus
	ephemeral *proc.Process
	home      string
	link      *linkWatch
	// reconnectTimeout bounds how long a follow waits for a lost bus
	// (0 = forever).
	reconnectTimeout time.Duration
}

// linkWatch passes a connection's losses and recoveries to whoever follows
// a job on it at the moment, so the user hears of an outage.
type linkWatch struct {
	mu  sync.Mutex
	fn  func(up bool, url string)
	url string // the server the connection is on, or was on when lost
}

func (w *linkWatch) lost(url string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if url != "" {
		w.url = url
	}
	if w.fn != nil {
		w.fn(false, w.url)
	}
}

func (w *linkWatch) back() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fn != nil {
		w.fn(true, w.url)
	}
}

// watchLink calls fn for each loss (up false) and recovery (up true) of the
// session's connection, one call at a time, until stop; stop returns after
// a call in progress. A connection already down when the watch starts is
// reported at once.
func (s *Session) watchLink(fn func(up bool, url string)) (stop func()) {
	w := s.link
	if w == nil {
		return func() {}
	}
	w.mu.Lock()
	w.fn = fn
	if s.Bus.NC.IsReconnecting() {
		fn(false, w.url)
	}
	w.mu.Unlock()
	return func() {
		w.mu.Lock()
		w.fn = nil
		w.mu.Unlock()
	}
}

// localPort is where the local queen's bus listens.
func localPort() int {
	if p, err := strconv.Atoi(os.Getenv("RBEE_NATS_PORT")); err == nil && p > 0 {
		return p
	}
	return bus.DefaultPort
}

// LocalURL is the bus address of the local queen.
func LocalURL() string { return fmt.Sprintf("nats://127.0.0.1:%d", localPort()) }

// connectOnly reaches the bus without ever starting anything.
func connectOnly(ctx context.Context, c *cli.Context, url string) (*bus.Bus, error) {
	b, _, err := dial(ctx, c, url)
	return b, err
}

// credentials are the ones the command line names, else the client
// credentials of the queen on this machine, which it issued at its first
// start.
func credentials(c *cli.Context) bus.Credentials {
	cr := cliutil.Credentials(c)
	if cr.Empty() {
		if f := DefaultKeyFile(); fileExists(f) {
			cr.KeyFile = f
		}
	}
	if cr.CAFile == "" && (cr.KeyFile == "" || auth.KeyFileCA(cr.KeyFile) == nil) {
		// The local queen's CA, used only if its bus asks for TLS.
		if f := auth.CAFile(queen.TLSDir(cliutil.Home())); fileExists(f) {
			cr.CAFile = f
		}
	}
	return cr
}

// DefaultKeyFile is where the keeper looks for its credentials when none
// are named: the client credential of the local queen.
func DefaultKeyFile() string {
	return filepath.Join(queen.CredentialsDir(cliutil.Home()), auth.ClientName+".nk")
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// dial connects to the bus at url; the watch reports the connection's
// losses and recoveries.
func dial(ctx context.Context, c *cli.Context, url string) (*bus.Bus, *linkWatch, error) {
	w := &linkWatch{}
	cr := credentials(c)
	b, err := bus.Connect(ctx, bus.ConnectConfig{
		URL: url, Name: "rbee", Namespace: c.String(cliutil.FlagNamespace), Credentials: cr,
		Reconnect: true, Timeout: 2 * time.Second, Log: zerolog.Nop(),
		OnDisconnect: w.lost, OnReconnect: w.back,
		// A client may not delete consumers: its followers' go away by
		// themselves once unread.
		ConsumersExpire: true,
	})
	if errors.Is(err, bus.ErrRefused) {
		how := "pass the file with --creds FILE (or RBEE_CREDS)"
		if cr.KeyFile == "" {
			how = "pass it with --creds FILE (or RBEE_CREDS); none was found at " + DefaultKeyFile()
		}
		return nil, nil, fmt.Errorf("%w. On the queen's machine, `rbee creds issue client NAME` writes a client credential; %s", err, how)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w at %s: %v", ErrQueenUnreachable, url, err)
	}
	w.mu.Lock()
	if w.url == "" {
		w.url = b.NC.ConnectedUrlRedacted()
	}
	w.mu.Unlock()
	return b, w, nil
}

// Open connects to the queen. With an explicit --nats (or RBEE_NATS_URL) it
// never starts anything; otherwise, when no local queen answers and
// autoStart is set, it starts one for the length of the command.
func Open(ctx context.Context, c *cli.Context, autoStart bool) (*Session, error) {
	home := cliutil.Home()
	session := func(b *bus.Bus, w *linkWatch, p *proc.Process) *Session {
		return &Session{Bus: b, link: w, ephemeral: p, home: home, reconnectTimeout: c.Duration(FlagReconnectTimeout)}
	}
	if url := c.String(cliutil.FlagNATS); url != "" {
		b, w, err := dial(ctx, c, url)
		if err != nil {
			return nil, err
		}
		return session(b, w, nil), nil
	}
	b, w, err := dial(ctx, c, LocalURL())
	if err == nil {
		return session(b, w, nil), nil
	}
	if errors.Is(err, bus.ErrRefused) {
		// A queen answers and turned us away: starting another one
		// would not help.
		return nil, err
	}
	if !autoStart {
		return nil, fmt.Errorf("%w: no local queen at %s; start one with `rbee queen start`", ErrQueenUnreachable, LocalURL())
	}
	p, err := startQueen(ctx, c, home)
	if err != nil {
		return nil, err
	}
	b, w, err = waitQueenWatched(ctx, c, LocalURL(), 15*time.Second)
	if err != nil {
		_, _ = p.Stop(context.Background(), 5*time.Second)
		return nil, fmt.Errorf("the queen started for this command did not answer: %w; its log: %s\n%s", err, p.Log, proc.Tail(p.Log, 10))
	}
	return session(b, w, p), nil
}

// Close disconnects, and stops a queen this session started.
func (s *Session) Close() {
	s.Bus.Close()
	if s.ephemeral != nil {
		_, _ = s.ephemeral.Stop(context.Background(), 10*time.Second)
	}
}

func siblingBinary(name string) string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return name // fall back to PATH
}

func startQueen(_ context.Context, c *cli.Context, home string) (*proc.Process, error) {
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err
	}
	logPath := filepath.Join(home, "logs", "queen.log")
	args := []string{"--data", home, "--listen", fmt.Sprintf("127.0.0.1:%d", localPort()), "--namespace", c.String(cliutil.FlagNamespace)}
	if gw := os.Getenv("RBEE_GATEWAY"); gw != "" {
		args = append(args, "--gateway", gw)
	}
	p, err := proc.Start(proc.Spec{Path: siblingBinary("queen-rbee"), Args: args, LogPath: logPath,
		Env: cliutil.CredentialEnv(cliutil.Credentials(c))})
	if err != nil {
		return nil, fmt.Errorf("starting queen-rbee: %w", err)
	}
	return p, nil
}

// waitQueen connects and waits until the queen's status endpoint answers.
func waitQueen(ctx context.Context, c *cli.Context, url string, within time.Duration) (*bus.Bus, error) {
	b, _, err := waitQueenWatched(ctx, c, url, within)
	return b, err
}

func waitQueenWatched(ctx context.Context, c *cli.Context, url string, within time.Duration) (*bus.Bus, *linkWatch, error) {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var lastErr error
	for ctx.Err() == nil {
		b, w, err := dial(ctx, c, url)
		if err == nil {
			cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
			err = b.Call(cctx, b.Space.Queen(api.EpStatus), nil, nil)
			ccancel()
			if err == nil {
				return b, w, nil
			}
			b.NC.Close()
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	return nil, nil, lastErr
}

// queenPID reads the local queen's pid file; 0 when there is none or the
// process is gone.
func queenPID(home string) int {
	b, err := os.ReadFile(cliutil.QueenPIDFile(home))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(string(b))
	if !proc.Alive(pid) {
		return 0
	}
	return pid
}
