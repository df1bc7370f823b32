package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// benchJobs measures the control plane's job throughput: max_tokens 1 jobs
// on the tiny model over two workers, from 1, 16 and 128 concurrent
// clients, then a flood of jobs submitted at once.
func benchJobs(ctx context.Context, e *env) (*Table, error) {
	type level struct{ clients, jobs int }
	levels := []level{{1, 200}, {16, 800}, {128, 2000}}
	flood := 10_000
	if e.opts.Quick {
		levels = []level{{1, 50}, {16, 200}, {128, 500}}
		flood = 2_000
	}
	t := &Table{
		Intro:  "Each job is an `infer` of 1 token (max_tokens 1, greedy) on the tiny model, submitted to the queen's `submit` endpoint and followed to its terminal state with bus.Follow, as `rbee infer` does; two llm-worker-rbee (1 slot, 1 thread each) on one rbee-hive serve the model's work queue. Latency is submit → terminal state event at the client; jobs/s is jobs / wall time of the level.",
		Header: []string{"concurrent clients", "jobs", "jobs/s", "latency p50", "latency p99", "failed"},
	}
	c, _, err := e.startQueen(ctx, queenSpec{Args: []string{"--max-queue", strconv.Itoa(flood * 2)}})
	if err != nil {
		return t, err
	}
	defer c.close()
	if _, _, err := c.startHive(ctx, "local"); err != nil {
		return t, err
	}
	if err := c.synth(ctx, "local", "tiny", "tiny"); err != nil {
		return t, err
	}
	for i := 0; i < 2; i++ {
		if _, err := c.spawnWorker(ctx, "local", "tiny"); err != nil {
			return t, err
		}
	}
	// Warm up both workers.
	for i := 0; i < 4; i++ {
		if _, err := c.oneJob(ctx); err != nil {
			return t, fmt.Errorf("warm-up job: %w", err)
		}
	}
	for _, lv := range levels {
		if ctx.Err() != nil {
			return t, ctx.Err()
		}
		var mu sync.Mutex
		var lat []time.Duration
		var failed []string
		var next atomic.Int64
		var wg sync.WaitGroup
		t0 := time.Now()
		for i := 0; i < lv.clients; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for next.Add(1) <= int64(lv.jobs) && ctx.Err() == nil {
					d, err := c.oneJob(ctx)
					mu.Lock()
					if err != nil {
						failed = append(failed, err.Error())
					} else {
						lat = append(lat, d)
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		wall := time.Since(t0)
		d := durations(lat)
		row := []string{strconv.Itoa(lv.clients), strconv.Itoa(lv.jobs), num(float64(len(lat)) / wall.Seconds()), ms(d.p50()), ms(d.p99()), strconv.Itoa(len(failed))}
		t.Rows = append(t.Rows, row)
		if len(failed) > 0 {
			t.Notes = append(t.Notes, fmt.Sprintf("%d clients: first failure: %s", lv.clients, failed[0]))
		}
		e.logf("jobs: %d clients: %s jobs/s, p50 %s", lv.clients, row[2], row[3])
	}
	ft, err := c.floodJobs(ctx, e, flood)
	if ft != nil {
		t.More = append(t.More, ft)
	}
	return t, err
}

func (c *cluster) oneJob(ctx context.Context) (time.Duration, error) {
	args := inferArgs("tiny", 1)
	raw, _ := json.Marshal(args)
	t0 := time.Now()
	var reply api.SubmitReply
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
	cancel()
	if err != nil {
		return 0, err
	}
	var final *api.StateChange
	fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = c.b.Follow(fctx, reply.JobID, 0, func(ev api.Event) error {
		if ev.Terminal() {
			final = ev.State
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	if final.State != api.JobCompleted {
		return 0, fmt.Errorf("job %s %s: %s", reply.JobID, final.State, final.Error)
	}
	return time.Since(t0), nil
}

// floodJobs submits n jobs at once and checks every one ran exactly once.
func (c *cluster) floodJobs(ctx context.Context, e *env, n int) (*Table, error) {
	t := &Table{
		Intro:  fmt.Sprintf("**The queue:** %s jobs submitted at once by 64 concurrent submitters (the queen started with `--max-queue %d`, since the default 1024 per model would refuse most of them), then checked: every job record in KV `rbee_jobs` terminal, and each job's token subject in `RBEE_JOBS` holding exactly one token event (none lost, none run twice); running transitions counted from the state events.", thousands(int64(n)), n*2),
		Header: []string{"submitted", "accepted", "refused", "completed", "failed/cancelled", "never terminal", "jobs with ≠ 1 token event", "jobs started twice", "submit rate (jobs/s)", "drain rate (jobs/s)", "time to drain"},
	}
	type jobSeen struct {
		running  int
		terminal time.Time
		state    api.JobState
	}
	var mu sync.Mutex
	seen := map[string]*jobSeen{}
	sub, err := c.b.NC.Subscribe(c.b.Space.EveryJob(subjects.EventState), func(m *nats.Msg) {
		id, _, ok := c.b.Space.JobIDFromSubject(m.Subject)
		if !ok {
			return
		}
		var sc api.StateChange
		if json.Unmarshal(m.Data, &sc) != nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		s := seen[id]
		if s == nil {
			s = &jobSeen{}
			seen[id] = s
		}
		if sc.State == api.JobRunning {
			s.running++
		}
		if sc.State.Terminal() && s.terminal.IsZero() {
			s.terminal, s.state = time.Now(), sc.State
		}
	})
	if err != nil {
		return t, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	_ = sub.SetPendingLimits(-1, -1)

	raw, _ := json.Marshal(inferArgs("tiny", 1))
	ids := make([]string, 0, n)
	var refused int
	var firstRefusal string
	var next atomic.Int64
	var wg sync.WaitGroup
	var idMu sync.Mutex
	t0 := time.Now()
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				var reply api.SubmitReply
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				err := c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
				cancel()
				idMu.Lock()
				if err != nil {
					refused++
					if firstRefusal == "" {
						firstRefusal = err.Error()
					}
				} else {
					ids = append(ids, reply.JobID)
				}
				idMu.Unlock()
			}
		}()
	}
	wg.Wait()
	submitted := time.Since(t0)
	e.logf("jobs: %d submitted in %s, waiting for them to finish", len(ids), submitted.Round(time.Millisecond))
	// Wait for every accepted job's terminal state, boundedly.
	waitFor(ctx, 5*time.Minute, 200*time.Millisecond, func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, id := range ids {
			if s := seen[id]; s == nil || s.terminal.IsZero() {
				return false
			}
		}
		return true
	})
	var last time.Time
	completed, other, never, twice := 0, 0, 0, 0
	mu.Lock()
	for _, id := range ids {
		s := seen[id]
		if s == nil || s.terminal.IsZero() {
			never++
			continue
		}
		if s.terminal.After(last) {
			last = s.terminal
		}
		if s.state == api.JobCompleted {
			completed++
		} else {
			other++
		}
		if s.running > 1 {
			twice++
		}
	}
	mu.Unlock()
	// The records and the stored token events are the ground truth.
	kv, err := c.b.KV(ctx, c.b.Space.JobsBucket())
	if err != nil {
		return t, err
	}
	notTerminal := 0
	for _, id := range ids {
		en, err := kv.Get(ctx, id)
		if err != nil {
			notTerminal++
			continue
		}
		var j api.Job
		if json.Unmarshal(en.Value(), &j) != nil || !j.State.Terminal() {
			notTerminal++
		}
	}
	tokens, err := tokenCounts(ctx, c)
	if err != nil {
		return t, err
	}
	wrongTokens := 0
	for _, id := range ids {
		if tokens[id] != 1 {
			wrongTokens++
		}
	}
	drain := last.Sub(t0)
	if last.IsZero() {
		drain = 0
	}
	t.Rows = append(t.Rows, []string{thousands(int64(n)), thousands(int64(len(ids))), strconv.Itoa(refused), thousands(int64(completed)), strconv.Itoa(other),
		fmt.Sprintf("%d (records not terminal: %d)", never, notTerminal), strconv.Itoa(wrongTokens), strconv.Itoa(twice),
		num(float64(len(ids)) / submitted.Seconds()), num(float64(completed) / drain.Seconds()), drain.Round(10 * time.Millisecond).String()})
	if firstRefusal != "" {
		t.Notes = append(t.Notes, "First refusal: "+firstRefusal)
	}
	ok := refused == 0 && never == 0 && notTerminal == 0 && wrongTokens == 0 && twice == 0 && completed == n
	e.target(Target{Bench: 3, Claim: fmt.Sprintf("%s jobs submitted at once all complete, none lost or run twice", thousands(int64(n))), Holds: holds(ok),
		Detail: fmt.Sprintf("%d completed, %d other terminal, %d never terminal, %d with ≠ 1 token, %d started twice, %d refused; drained in %s", completed, other, never, wrongTokens, twice, refused, drain.Round(10*time.Millisecond))})
	return t, nil
}

// tokenCounts is the number of stored token events per job id.
func tokenCounts(ctx context.Context, c *cluster) (map[string]uint64, error) {
	st, err := c.b.JS.Stream(ctx, c.b.Space.JobsStream())
	if err != nil {
		return nil, err
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(c.b.Space.EveryJob(subjects.EventToken)))
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for subj, n := range info.State.Subjects {
		if id, kind, ok := c.b.Space.JobIDFromSubject(subj); ok && kind == "token" {
			out[id] = n
		}
	}
	if len(out) == 0 && info.State.NumSubjects > 0 {
		return out, errors.New("the stream did not list its token subjects")
	}
	return out, nil
}

var _ = strings.Join
