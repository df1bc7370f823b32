package keeper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// App builds the rbee command line.
func App() *cli.App {
	flags := append(cliutil.BusFlags(),
		&cli.BoolFlag{Name: "json", Usage: "print NDJSON events and JSON results on stdout"},
		&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "print results (tokens) only"},
		&cli.DurationFlag{Name: FlagReconnectTimeout, Value: DefaultReconnectTimeout, EnvVars: []string{"RBEE_RECONNECT_TIMEOUT"},
			Usage: "while following a job (infer, jobs attach), give up with exit 3 when the bus is gone this long (0 = never)"},
	)
	app := &cli.App{
		Name:                 "rbee",
		Usage:                "run LLMs across every machine you own",
		Version:              version.Version,
		Flags:                flags,
		EnableBashCompletion: true,
		OnUsageError:         onUsageError,
		Before: func(c *cli.Context) error {
			if c.Duration(FlagReconnectTimeout) < 0 {
				return usage("--%s must not be negative (0 waits for the bus forever)", FlagReconnectTimeout)
			}
			return checkFlagValues(c, c.App.Flags)
		},
		Commands: []*cli.Command{
			queenCommand(),
			{Name: "status", Usage: "hives, workers, queues and jobs at a glance", Action: statusAction},
			hiveCommand(),
			jobsCommand(),
			inferCommand(),
			modelCommand(),
			workerCommand(),
			traceCommand(),
			credsCommand(),
			clusterCommand(),
		},
		CommandNotFound: func(c *cli.Context, name string) {
			fmt.Fprintf(os.Stderr, "rbee: unknown command %q; see `%s --help`\n", name, commandName(c))
			os.Exit(ExitUsage)
		},
	}
	prepareCommands(app.Commands)
	return app
}

// Main runs the app and returns the process exit status.
func Main(args []string) int {
	app := App()
	err := app.Run(interspersed(app, args))
	if err == nil {
		return ExitOK
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "rbee:", msg)
		}
		return ec.ExitCode()
	}
	fmt.Fprintln(os.Stderr, "rbee:", err)
	return exitCodeOf(err)
}

func exitCodeOf(err error) int {
	switch {
	case errors.Is(err, ErrQueenUnreachable), errors.Is(err, bus.ErrUnreachable), errors.Is(err, bus.ErrRefused), errors.Is(err, bus.ErrNoResponder), errors.Is(err, ErrBusLost):
		return ExitUnreachable
	case errors.Is(err, subjects.ErrInvalidID), errors.Is(err, errUsage):
		return ExitUsage
	case errors.Is(err, context.Canceled), errors.Is(err, errInterrupted):
		return ExitInterrupted
	}
	// The reason an answer of the queen (or a failed job) carries: what
	// the user asked for wrong is a usage error, anything else a failure.
	// Never the message's words.
	switch api.ReasonOf(err) {
	case api.ReasonInvalidRequest, api.ReasonInvalidParam, api.ReasonPromptTooLong, api.ReasonPayloadTooLarge:
		return ExitUsage
	}
	return ExitFailed
}

var (
	errUsage       = errors.New("usage")
	errInterrupted = errors.New("interrupted")
)

func usage(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

func printer(c *cli.Context) *Printer {
	return &Printer{
		Out: os.Stdout, Err: os.Stderr, JSON: c.Bool("json"), Quiet: c.Bool("quiet"),
		Terminal: term.IsTerminal(int(os.Stderr.Fd())),
		Shared:   sameFile(os.Stdout, os.Stderr),
	}
}

// sameFile says whether two descriptors write to one place (`2>&1`, or both
// on one terminal), where token text and narration lines interleave.
func sameFile(a, b *os.File) bool {
	ia, err1 := a.Stat()
	ib, err2 := b.Stat()
	return err1 == nil && err2 == nil && os.SameFile(ia, ib)
}

// withSession runs fn connected to the queen, starting an ephemeral local
// queen when none answers (unless --nats was given).
func withSession(c *cli.Context, autoStart bool, fn func(ctx context.Context, s *Session) error) error {
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	octx, cancel := context.WithTimeout(ctx, 20*time.Second)
	s, err := Open(octx, c, autoStart)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return errInterrupted
		}
		return err
	}
	defer s.Close()
	return fn(ctx, s)
}

// call sends one request to a queen endpoint. A queen that is not there is
// reported as unreachable.
func call(ctx context.Context, s *Session, endpoint string, req, out any) error {
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	err := s.Bus.Call(cctx, s.Bus.Space.Queen(endpoint), req, out)
	// Nobody received a request that found no responder, so it is asked
	// again for a while: on a NATS cluster a queen whose server just died
	// is away until it has reconnected to another (about a second).
	give := time.Now().Add(queenAwayGrace)
	for wait := 50 * time.Millisecond; errors.Is(err, bus.ErrNoResponder) && time.Now().Before(give); wait = min(2*wait, 500*time.Millisecond) {
		select {
		case <-cctx.Done():
			return fmt.Errorf("%w: the bus answers but no queen serves it", ErrQueenUnreachable)
		case <-time.After(wait):
		}
		err = s.Bus.Call(cctx, s.Bus.Space.Queen(endpoint), req, out)
	}
	if errors.Is(err, bus.ErrNoResponder) {
		return fmt.Errorf("%w: the bus answers but no queen serves it", ErrQueenUnreachable)
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		// Our own bound, not the command's: the queen (or the bus it
		// embeds) is away, which is exit 3, and worth trying again.
		return fmt.Errorf("%w: no answer to %s within 15s", ErrQueenUnreachable, endpoint)
	}
	return err
}

// queenAwayGrace is how long a call goes on asking a bus on which no queen
// answers, before it says the queen is unreachable.
const queenAwayGrace = 3 * time.Second

// show prints a result: JSON when asked, else the human form.
func show(c *cli.Context, v any, human func(io.Writer)) {
	if c.Bool("json") {
		printer(c).JSONValue(v)
		return
	}
	human(os.Stdout)
}

// ask makes one call to the queen and shows the reply: as JSON with
// --json, else through human.
func ask[Resp any](c *cli.Context, endpoint string, req any, human func(io.Writer, Resp)) error {
	return withSession(c, true, func(ctx context.Context, s *Session) error {
		var r Resp
		if err := call(ctx, s, endpoint, req, &r); err != nil {
			return err
		}
		show(c, r, func(w io.Writer) { human(w, r) })
		return nil
	})
}

// askLive is ask for a report on hives and workers: from a queen started
// for this command, only once it can know who is alive (awaitLiveness).
func askLive[Resp any](c *cli.Context, endpoint string, req any, human func(io.Writer, Resp)) error {
	return withSession(c, true, func(ctx context.Context, s *Session) error {
		if err := awaitLiveness(ctx, s); err != nil {
			return err
		}
		var r Resp
		if err := call(ctx, s, endpoint, req, &r); err != nil {
			return err
		}
		show(c, r, func(w io.Writer) { human(w, r) })
		return nil
	})
}

// submitAndFollow submits an operation as a job and follows it to its end.
// Ctrl-C cancels the job and exits 130. It returns the terminal state.
func submitAndFollow(c *cli.Context, s *Session, ctx context.Context, op api.Operation, timeout time.Duration, detach bool) (*api.StateChange, error) {
	// The keeper names the job, so that it can attach to the job's events
	// while the queen admits it rather than after: the follower's consumer
	// is then in place when the first token comes.
	req := api.SubmitRequest{Op: op, Timeout: api.Duration(timeout), JobID: jobs.NewID()}
	p := printer(c)
	var reply api.SubmitReply
	if detach {
		if err := call(ctx, s, api.EpSubmit, req, &reply); err != nil {
			return nil, err
		}
		if p.JSON {
			p.JSONValue(reply)
		} else {
			fmt.Fprintln(os.Stdout, reply.JobID)
		}
		return nil, nil
	}
	submitted := make(chan error, 1)
	go func() { submitted <- call(ctx, s, api.EpSubmit, req, &reply) }()
	return followSubmitted(ctx, s, p, req.JobID, op.Kind, submitted)
}

// FlagReconnectTimeout names the flag that bounds an outage while following.
const FlagReconnectTimeout = "reconnect-timeout"

// follow shows a job's events until its terminal state. When the context
// ends (Ctrl-C) it cancels the job if cancelOnInterrupt, then reports the
// interruption. When the bus goes away it says so once, and once when it is
// back; an outage longer than the session's reconnect timeout ends the
// follow with ErrBusLost and the command that resumes where it stopped.
func follow(ctx context.Context, s *Session, p *Printer, jobID string, from uint64, cancelOnInterrupt bool) (*api.StateChange, error) {
	return followJob(ctx, s, p, jobID, from, cancelOnInterrupt, "", nil)
}

// followSubmitted follows a job from its start while it is being
// submitted: nothing is shown until submitted says the queen took it, and
// a refused submission ends the follow with the queen's error.
func followSubmitted(ctx context.Context, s *Session, p *Printer, jobID, kind string, submitted <-chan error) (*api.StateChange, error) {
	return followJob(ctx, s, p, jobID, 0, true, kind, submitted)
}

func followJob(ctx context.Context, s *Session, p *Printer, jobID string, from uint64, cancelOnInterrupt bool, kind string, submitted <-chan error) (*api.StateChange, error) {
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// mu serialises the printer between the follow and the connection's
	// callbacks, and guards what both record.
	var (
		mu     sync.Mutex
		final  *api.StateChange
		next   = from // where a re-attach resumes: past every event shown
		down   bool
		gaveUp bool
		over   bool // follow has returned: show nothing more
		timer  *time.Timer
	)
	// opened is closed once the submission (if any) is confirmed; events
	// wait for it, so the job's own events follow "submitted". decided is
	// closed once its outcome is known; refused is set before, if the
	// queen refused it.
	opened, decided := make(chan struct{}), make(chan struct{})
	var refused error
	if submitted == nil {
		close(opened)
		close(decided)
	} else {
		go func() {
			defer close(decided)
			// The call ends by itself: it has a timeout and ends with ctx.
			if err := <-submitted; err != nil {
				refused = err
				cancel()
				return
			}
			mu.Lock()
			p.Message("[rbee] job %s submitted (%s)", jobID, kind)
			mu.Unlock()
			close(opened)
		}()
	}
	giveUp := s.reconnectTimeout
	stopWatch := s.watchLink(func(up bool, url string) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case over || gaveUp:
		case !up && !down:
			down = true
			if giveUp > 0 {
				p.Message("[rbee] lost the bus at %s; reconnecting (giving up after %s, --%s)", url, giveUp, FlagReconnectTimeout)
				timer = time.AfterFunc(giveUp, func() {
					mu.Lock()
					defer mu.Unlock()
					if down && !over {
						gaveUp = true
						cancel()
					}
				})
			} else {
				p.Message("[rbee] lost the bus at %s; reconnecting (no time limit, --%s 0)", url, FlagReconnectTimeout)
			}
		case up && down:
			down = false
			if timer != nil {
				timer.Stop()
			}
			p.Message("[rbee] reconnected; following job %s again", jobID)
		}
	})
	done := make(chan error, 1)
	go func() {
		done <- s.Bus.Follow(fctx, jobID, from, func(ev api.Event) error {
			select {
			case <-opened:
			case <-fctx.Done():
				return fctx.Err()
			}
			mu.Lock()
			defer mu.Unlock()
			if over {
				return bus.ErrFollowEnded
			}
			p.Event(ev)
			if ev.Seq >= next {
				next = ev.Seq + 1
			}
			if ev.Terminal() {
				final = ev.State
			}
			return nil
		})
	}()
	var err error
	select {
	case err = <-done:
	case <-fctx.Done():
		// While the bus is down the consumer's own retries can hold
		// Follow for seconds after its context ends; the command is
		// over either way, and the connection's close ends them.
		select {
		case err = <-done:
		case <-time.After(time.Second):
			err = fctx.Err()
		}
	}
	stopWatch()
	<-decided
	if refused != nil {
		p.Done()
		return nil, refused
	}
	mu.Lock()
	over = true
	if timer != nil {
		timer.Stop()
	}
	lost := gaveUp && final == nil
	mu.Unlock()
	p.Done()
	if ctx.Err() != nil {
		// The caller's deadline (infer --timeout) ends the follow like
		// Ctrl-C, but its error is the whole report: no "interrupted".
		cause := context.Cause(ctx)
		timedOut := errors.Is(cause, errTimedOut)
		if cancelOnInterrupt {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = s.Bus.Call(cctx, s.Bus.Space.Queen(api.EpJobCancel), api.JobRequest{ID: jobID}, nil)
			if !timedOut {
				p.Message("[rbee] interrupted: job %s cancelled", jobID)
			}
		} else if !timedOut {
			p.Message("[rbee] detached from job %s; re-attach with `rbee jobs attach %s`", jobID, jobID)
		}
		if timedOut {
			return nil, cause
		}
		return nil, errInterrupted
	}
	if lost {
		again := fmt.Sprintf("rbee jobs attach %s", jobID)
		if next > 0 {
			again += fmt.Sprintf(" --from %d", next)
		}
		return nil, fmt.Errorf("%w for %s; job %s may still be running: re-attach with `%s`", ErrBusLost, giveUp, jobID, again)
	}
	if err != nil {
		return nil, err
	}
	return final, nil
}

// finish turns a terminal state into the command's outcome.
func finish(final *api.StateChange) error {
	if final == nil {
		return nil
	}
	switch final.State {
	case api.JobCompleted:
		return nil
	case api.JobCancelled:
		return fmt.Errorf("job cancelled: %w", final.Err())
	default:
		// The reason travels with the error, so a job the worker refused
		// for a bad parameter exits 2 like any other usage error.
		return fmt.Errorf("job failed: %w", final.Err())
	}
}

func decodeResult[T any](final *api.StateChange) (T, bool) {
	var v T
	if final == nil || len(final.Result) == 0 {
		return v, false
	}
	return v, json.Unmarshal(final.Result, &v) == nil
}

func needArgs(c *cli.Context, n int, what string) error {
	if c.NArg() != n {
		return usage("%s needs %s", commandName(c), what)
	}
	return nil
}

// idArg returns the command's one argument, an id of kind, or a usage
// error naming what is missing or wrong.
func idArg(c *cli.Context, kind subjects.Kind, what string) (string, error) {
	if err := needArgs(c, 1, what); err != nil {
		return "", err
	}
	id := c.Args().First()
	return id, validID(kind, id)
}

func validID(kind subjects.Kind, id string) error {
	if err := subjects.ValidateID(kind, id); err != nil {
		return err
	}
	return nil
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func joinNonEmpty(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, ", ")
}
