package bench

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// streamRun is one job's token stream as its followers saw it.
type streamRun struct {
	followers  int
	tokens     int
	pubRate    float64   // tokens/s the publisher got acknowledged
	rates      []float64 // per follower: tokens/s from first publish to its last token
	lost, dups int
}

// benchStream measures the token stream: one publisher (bus.Tokens, as the
// worker publishes) to 1, 10 and 100 followers (bus.Follow, as the keeper
// and gateway follow) of one job, through the real JetStream stream of an
// embedded server that listens on TCP like the queen's.
func benchStream(ctx context.Context, e *env) (*Table, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: e.dir("stream"), Listen: "127.0.0.1:" + strconv.Itoa(port), Log: zerolog.Nop()})
	if err != nil {
		return nil, err
	}
	defer srv.Shutdown()
	url := srv.ClientURL()
	pub, err := connectBus(ctx, url, "bench-publisher", 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer pub.NC.Close()
	if err := pub.EnsureStreams(ctx, bus.DefaultRetention()); err != nil {
		return nil, err
	}
	type level struct{ followers, tokens int }
	levels := []level{{1, 50_000}, {10, 20_000}, {100, 5_000}}
	rounds := 3
	if e.opts.Quick {
		levels = []level{{1, 20_000}, {10, 5_000}, {100, 1_000}}
		rounds = 1
	}
	// One connection per follower, like separate keepers.
	conns := make([]*bus.Bus, 100)
	for i := range conns {
		if conns[i], err = connectBus(ctx, url, fmt.Sprintf("bench-follower-%d", i), 5*time.Second); err != nil {
			return nil, err
		}
		defer conns[i].NC.Close()
	}
	t := &Table{
		Intro: "One publisher streams a job's tokens with `bus.Tokens` (as the worker does: a token goes out at once when nothing is in flight, the tokens that came meanwhile as one chunk message when the ack comes) while followers attached with `bus.Follow` (an ordered consumer each, as `rbee infer` and the gateway do) receive them, each on its own TCP connection to an embedded nats-server with the real `RBEE_JOBS` stream (file storage). " +
			"Rate = tokens a follower received (tokens, not messages: `bus.Follow` hands out one event per token of a chunk) / time from the first publish to its last token. Followers attach before the first token. " + fmt.Sprintf("%d round(s) per row; medians over rounds and followers.", rounds),
		Header: []string{"followers", "tokens per job", "publisher acked tokens/s", "per-follower tokens/s p50", "slowest follower tokens/s", "delivered events/s (all followers)", "lost", "duplicates"},
	}
	var oneFollower float64
	totalLost, totalDups := 0, 0
	for _, lv := range levels {
		var runs []streamRun
		for r := 0; r < rounds; r++ {
			if ctx.Err() != nil {
				return t, ctx.Err()
			}
			run, err := streamOnce(ctx, pub, conns[:lv.followers], lv.tokens)
			if err != nil {
				return t, fmt.Errorf("%d followers: %w", lv.followers, err)
			}
			runs = append(runs, run)
		}
		var rates, pubRates, slowest sample
		lost, dups := 0, 0
		for _, r := range runs {
			rates = append(rates, r.rates...)
			pubRates = append(pubRates, r.pubRate)
			slowest = append(slowest, sample(r.rates).pct(0))
			lost += r.lost
			dups += r.dups
		}
		totalLost += lost
		totalDups += dups
		if lv.followers == 1 {
			oneFollower = rates.p50()
		}
		agg := slowest.p50() * float64(lv.followers)
		t.Rows = append(t.Rows, []string{
			strconv.Itoa(lv.followers), thousands(int64(lv.tokens)), num(pubRates.p50()), num(rates.p50()), num(slowest.p50()),
			num(agg), strconv.Itoa(lost), strconv.Itoa(dups),
		})
		e.logf("stream: %d followers: %s tokens/s per follower, lost %d, dups %d", lv.followers, num(rates.p50()), lost, dups)
	}
	t.Notes = append(t.Notes,
		"Loss and duplicates are checked per follower by token index: every index 0…N-1 exactly once, in order of arrival.",
		"The publisher and the followers share the bench process and the machine's cores with the server, so with 100 followers the server's fan-out competes with 100 decoding clients.",
		"The publisher publishes as fast as it can, so nearly every message is a chunk (up to 1,024 tokens); a model slower than one publish round trip still sends each token alone, as it comes.")
	e.target(Target{Bench: 2, Claim: "≥ 500,000 tokens/s to one follower", Holds: holds(oneFollower >= 500_000), Detail: num(oneFollower) + " tokens/s (p50)"})
	e.target(Target{Bench: 2, Claim: "no token lost or duplicated (1, 10, 100 followers)", Holds: holds(totalLost == 0 && totalDups == 0), Detail: fmt.Sprintf("%d lost, %d duplicated", totalLost, totalDups)})
	return t, nil
}

func streamOnce(ctx context.Context, pub *bus.Bus, followers []*bus.Bus, n int) (streamRun, error) {
	job := jobs.NewID()
	run := streamRun{followers: len(followers), tokens: n}
	type result struct {
		count, unique, outOfOrder int
		last                      time.Time
		err                       error
	}
	results := make([]result, len(followers))
	var ready, done sync.WaitGroup
	fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for i, fb := range followers {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			seen := make([]bool, n)
			res := &results[i]
			signalled := false
			next := 0
			res.err = fb.Follow(fctx, job, 0, func(ev api.Event) error {
				switch {
				case ev.Narration != nil && !signalled:
					signalled = true
					ready.Done()
				case ev.Token != nil:
					res.count++
					res.last = time.Now()
					idx := ev.Token.Index
					if idx >= 0 && idx < n && !seen[idx] {
						seen[idx] = true
						res.unique++
					}
					if idx != next {
						res.outOfOrder++
					}
					next = idx + 1
				}
				return nil
			})
			if !signalled {
				ready.Done()
			}
		}()
	}
	// A narration event first: each follower reports in when it sees it,
	// so the tokens are measured live, not as a replay.
	if err := pub.PublishEvent(ctx, job, subjects.EventNarration, api.Narration{Time: time.Now(), Level: "info", Human: "bench start"}); err != nil {
		return run, err
	}
	ready.Wait()
	tp, err := pub.Tokens(job)
	if err != nil {
		return run, err
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if err := tp.Publish(api.Token{Index: i, ID: int32(3 + i%300), Text: "tok"}); err != nil {
			return run, err
		}
	}
	if err := tp.Flush(ctx); err != nil {
		return run, err
	}
	run.pubRate = float64(n) / time.Since(t0).Seconds()
	if err := pub.PublishEvent(ctx, job, subjects.EventState, api.StateChange{Time: time.Now(), From: api.JobRunning, State: api.JobCompleted}); err != nil {
		return run, err
	}
	done.Wait()
	for _, r := range results {
		if r.err != nil {
			return run, r.err
		}
		run.lost += n - r.unique
		run.dups += r.count - r.unique
		if r.count > 0 {
			run.rates = append(run.rates, float64(r.count)/r.last.Sub(t0).Seconds())
		} else {
			run.rates = append(run.rates, 0)
		}
	}
	return run, nil
}
