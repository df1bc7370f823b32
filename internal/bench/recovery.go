package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// benchRecovery measures how fast the queen's scheduler recovers from the
// two boundaries issue 9 is about: the queen (and its embedded bus) killed
// and restarted while jobs stream, and a worker spawn that fails while jobs
// wait on it.
func benchRecovery(ctx context.Context, e *env) (*Table, error) {
	rounds, streams, waiters := 5, 2, 8
	if e.opts.Quick {
		rounds, waiters = 2, 4
	}
	t := &Table{
		Intro: fmt.Sprintf("**Queen restart:** a queen with its embedded bus, one rbee-hive and %d llm-worker-rbee on the large model; %d jobs of %d tokens (greedy, the prompt of table 1) stream to bench followers (bus.Follow, reconnecting as the keeper does); once every follower has a token, the queen is killed with SIGKILL and started again at once on the same data directory and port. Measured: from the new queen's exec to the moment every follower has received a new token (and, in brackets, from the kill). Every job must then complete with all its tokens, none failed. "+
			"**Spawn failure:** a hive whose worker program exits at once (`--worker-bin /bin/false`), %d jobs for a model no worker serves submitted together; measured from the last submit to the moment every waiter's failure reached its follower, and the spread between the first and the last failure. %d rounds each.", streams, streams, recoveryTokens, waiters, rounds),
		Header: []string{"boundary", "rounds", "p50", "p99", "max", "outcome"},
	}
	restart, detail, err := restartRounds(ctx, e, rounds, streams)
	if restart != nil {
		t.Rows = append(t.Rows, restart)
		t.Notes = append(t.Notes, detail...)
	}
	if err != nil {
		return t, err
	}
	spawn, spread, err := spawnFailureRounds(ctx, e, rounds, waiters)
	if spawn != nil {
		t.Rows = append(t.Rows, spawn, spread)
	}
	return t, err
}

// recoveryTokens outlasts a restart on the large model (about 4 s).
const recoveryTokens = 2000

func restartRounds(ctx context.Context, e *env, rounds, streams int) ([]string, []string, error) {
	c, _, err := e.startQueen(ctx, queenSpec{})
	if err != nil {
		return nil, nil, err
	}
	defer c.close()
	if _, _, err := c.startHive(ctx, "local"); err != nil {
		return nil, nil, err
	}
	if err := c.synth(ctx, "local", "large", "large"); err != nil {
		return nil, nil, err
	}
	for range streams {
		if _, err := c.spawnWorker(ctx, "local", "large"); err != nil {
			return nil, nil, err
		}
	}
	var fromExec, fromKill []time.Duration
	var failures []string
	for r := 0; r < rounds && ctx.Err() == nil; r++ {
		execAt, killAt, err := c.restartUnderLoad(ctx, streams)
		if err != nil {
			failures = append(failures, fmt.Sprintf("round %d: %v", r+1, err))
			continue
		}
		fromExec = append(fromExec, execAt)
		fromKill = append(fromKill, killAt)
		e.logf("recovery: restart round %d: streaming again %s after exec (%s after the kill)", r+1, execAt, killAt)
	}
	d, k := durations(fromExec), durations(fromKill)
	outcome := fmt.Sprintf("%d of %d rounds: every job completed with all %d tokens", len(fromExec), rounds, recoveryTokens)
	row := []string{"queen restart → every running job streaming again", fmt.Sprint(rounds),
		fmt.Sprintf("%s (%s)", ms(d.p50()), ms(k.p50())), fmt.Sprintf("%s (%s)", ms(d.p99()), ms(k.p99())), fmt.Sprintf("%s (%s)", ms(d.max()), ms(k.max())), outcome}
	e.target(Target{Bench: 7, Claim: "a queen restart fails no job whose worker lives", Holds: holds(len(failures) == 0 && len(fromExec) == rounds),
		Detail: fmt.Sprintf("%d of %d rounds without a failed job; streaming again p50 %s after the new queen's exec", len(fromExec), rounds, ms(d.p50()))})
	var notes []string
	if len(failures) > 0 {
		notes = append(notes, "Failed rounds: "+strings.Join(failures, "; "))
	}
	notes = append(notes, "Most of the time from the kill is the followers' reconnect (nats.go waits 250 ms plus up to 1 s of jitter between tries) and the new queen's start; the restarted queen's liveness grace (one heartbeat TTL, 3 s) delays no stream: it only holds off judging workers.")
	return row, notes, nil
}

// restartUnderLoad streams jobs, restarts the queen once every stream has
// begun, and returns when every stream has a token from after the restart.
func (c *cluster) restartUnderLoad(ctx context.Context, streams int) (fromExec, fromKill time.Duration, err error) {
	type stream struct {
		id     string
		mu     sync.Mutex
		last   time.Time
		tokens int
		final  *api.StateChange
		err    error
	}
	raw, _ := json.Marshal(inferArgs("large", recoveryTokens))
	ss := make([]*stream, streams)
	var wg sync.WaitGroup
	for i := range ss {
		var reply api.SubmitReply
		cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		err := c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
		cancel()
		if err != nil {
			return 0, 0, err
		}
		s := &stream{id: reply.JobID}
		ss[i] = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			fctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
			defer cancel()
			s.err = c.b.Follow(fctx, s.id, 0, func(ev api.Event) error {
				s.mu.Lock()
				defer s.mu.Unlock()
				if ev.Token != nil {
					s.tokens++
					s.last = time.Now()
				}
				if ev.Terminal() {
					s.final = ev.State
				}
				return nil
			})
		}()
	}
	defer wg.Wait()
	allSince := func(t time.Time) bool {
		for _, s := range ss {
			s.mu.Lock()
			ok := s.last.After(t)
			s.mu.Unlock()
			if !ok {
				return false
			}
		}
		return true
	}
	if !waitFor(ctx, time.Minute, time.Millisecond, func() bool { return allSince(time.Time{}) }) {
		return 0, 0, fmt.Errorf("the jobs did not start streaming")
	}
	killed := time.Now()
	execAt, err := c.restartQueen(ctx)
	if err != nil {
		return 0, 0, err
	}
	if !waitFor(ctx, time.Minute, time.Millisecond, func() bool { return allSince(execAt) }) {
		return 0, 0, fmt.Errorf("not every job streamed again within a minute of the restart")
	}
	back := time.Now()
	wg.Wait()
	for _, s := range ss {
		if s.err != nil {
			return 0, 0, fmt.Errorf("job %s: %w", s.id, s.err)
		}
		if s.final == nil || s.final.State != api.JobCompleted {
			reason := "no terminal state"
			if s.final != nil {
				reason = string(s.final.State) + ": " + s.final.Error
			}
			return 0, 0, fmt.Errorf("job %s: %s", s.id, reason)
		}
		if s.tokens != recoveryTokens {
			return 0, 0, fmt.Errorf("job %s: %d tokens, want %d", s.id, s.tokens, recoveryTokens)
		}
	}
	return back.Sub(execAt), back.Sub(killed), nil
}

func spawnFailureRounds(ctx context.Context, e *env, rounds, waiters int) (row, spread []string, err error) {
	c, _, err := e.startQueen(ctx, queenSpec{})
	if err != nil {
		return nil, nil, err
	}
	defer c.close()
	if _, _, err := c.startHive(ctx, "broken", "--worker-bin", "/bin/false"); err != nil {
		return nil, nil, err
	}
	if err := c.synth(ctx, "broken", "tiny", "tiny"); err != nil {
		return nil, nil, err
	}
	var toAll, spreads []time.Duration
	var wrong []string
	raw, _ := json.Marshal(inferArgs("tiny", 1))
	for r := 0; r < rounds && ctx.Err() == nil; r++ {
		var mu sync.Mutex
		var ends []time.Time
		var lastSubmit time.Time
		var wg sync.WaitGroup
		for range waiters {
			var reply api.SubmitReply
			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			err := c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
			cancel()
			if err != nil {
				return nil, nil, err
			}
			lastSubmit = time.Now()
			wg.Add(1)
			go func() {
				defer wg.Done()
				fctx, cancel := context.WithTimeout(ctx, time.Minute)
				defer cancel()
				_ = c.b.Follow(fctx, reply.JobID, 0, func(ev api.Event) error {
					if ev.Terminal() {
						mu.Lock()
						ends = append(ends, time.Now())
						if ev.State.State != api.JobFailed || !strings.Contains(ev.State.Error, "no worker could be started") {
							wrong = append(wrong, string(ev.State.State)+": "+ev.State.Error)
						}
						mu.Unlock()
					}
					return nil
				})
			}()
		}
		wg.Wait()
		if len(ends) != waiters {
			return nil, nil, fmt.Errorf("round %d: %d of %d waiters ended", r+1, len(ends), waiters)
		}
		first, last := ends[0], ends[0]
		for _, t := range ends {
			if t.Before(first) {
				first = t
			}
			if t.After(last) {
				last = t
			}
		}
		toAll = append(toAll, last.Sub(lastSubmit))
		spreads = append(spreads, last.Sub(first))
		e.logf("recovery: spawn failure round %d: every waiter failed %s after the last submit (spread %s)", r+1, last.Sub(lastSubmit), last.Sub(first))
	}
	d, s := durations(toAll), durations(spreads)
	outcome := fmt.Sprintf("%d waiters a round; %d failed with another reason", waiters, len(wrong))
	e.target(Target{Bench: 7, Claim: "a failed spawn fails every waiter within 1 s", Holds: holds(len(wrong) == 0 && s.max() <= 1000),
		Detail: fmt.Sprintf("spread first → last failure max %s; last submit → every waiter failed p50 %s", ms(s.max()), ms(d.p50()))})
	return []string{"spawn failure → every waiter failed (from the last submit)", fmt.Sprint(rounds), ms(d.p50()), ms(d.p99()), ms(d.max()), outcome},
		[]string{"spawn failure: first → last waiter's failure", fmt.Sprint(rounds), ms(s.p50()), ms(s.p99()), ms(s.max()), "the same failure, told to every waiter together"}, nil
}
