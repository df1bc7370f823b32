package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/subjects"
)

// benchFailure kills hives and workers with SIGKILL and times how long the
// cluster takes to see them gone, with default settings.
func benchFailure(ctx context.Context, e *env) (*Table, error) {
	kills, batch := 20, 5
	if e.opts.Quick {
		kills = 6
	}
	interval := bus.DefaultHeartbeatInterval
	bound := 3*interval + time.Second
	t := &Table{
		Intro: fmt.Sprintf("`kill -9` of a real process, %d times each, in batches of %d killed at random moments within one heartbeat interval, default settings (heartbeat %s, entry TTL %s). "+
			"Detection is from the kill to the moment the registry entry's removal reaches a watcher of the bucket (the bench watches `rbee_hives` / `rbee_workers` exactly as the queen's registry does; the queen marks a hive `lost` on that purge, and drops a worker on its removal). Bound: 3 intervals + 1 s = %s.",
			kills, batch, interval, bus.TTLForInterval(interval), bound),
		Header: []string{"what is killed", "kills", "detected", "p50", "p99", "max", "p99 within bound", "how it is detected"},
	}
	c, _, err := e.startQueen(ctx, queenSpec{})
	if err != nil {
		return t, err
	}
	defer c.close()

	hiveDet, hiveMissed, herr := killHives(ctx, c, kills, batch, interval)
	t.Rows = append(t.Rows, failureRow("rbee-hive", kills, hiveDet, hiveMissed, bound, "its heartbeat entry expires (TTL) and is purged; the queen shows it `lost`"))
	if herr != nil {
		t.Notes = append(t.Notes, "Hives: "+herr.Error())
	}
	e.addFailureTarget("hive", hiveDet, hiveMissed, bound, herr)

	how := "its hive sees the child exit and removes its entry; else the TTL"
	spawn := c.hiveWorkers
	if _, err := e.binary("rbee-hive"); err != nil {
		// Without a hive, workers are exec'd directly: only their TTL
		// tells the cluster they are gone.
		how = "no rbee-hive in this build: workers exec'd directly, so only their entry's TTL expiry"
		spawn = c.directWorkers
	}
	workerDet, workerMissed, werr := killWorkers(ctx, c, kills, batch, interval, spawn)
	t.Rows = append(t.Rows, failureRow("llm-worker-rbee", kills, workerDet, workerMissed, bound, how))
	if werr != nil {
		t.Notes = append(t.Notes, "Workers: "+werr.Error())
	}
	e.addFailureTarget("worker", workerDet, workerMissed, bound, werr)
	t.More = append(t.More, &Table{
		Intro:  "For comparison, the published defaults of other systems for declaring a node or worker gone:",
		Header: []string{"system", "default before a silent node counts as lost"},
		Rows: [][]string{
			{"rbee (this run, hive p99)", ms(durations(hiveDet).p99())},
			{"GPUStack", "150 s grace period"},
			{"LocalAI (p2p/federated workers)", "60 s"},
			{"wasmCloud", "about 70 s"},
		},
	})
	return t, nil
}

func failureRow(what string, kills int, det []time.Duration, missed int, bound time.Duration, how string) []string {
	if len(det) == 0 {
		return []string{what, strconv.Itoa(kills), "0", "—", "—", "—", "not measured", how}
	}
	d := durations(det)
	within := yesNo(missed == 0 && d.p99() <= float64(bound.Milliseconds()))
	return []string{what, strconv.Itoa(len(det) + missed), strconv.Itoa(len(det)), ms(d.p50()), ms(d.p99()), ms(d.max()), within, how}
}

func (e *env) addFailureTarget(what string, det []time.Duration, missed int, bound time.Duration, err error) {
	claim := fmt.Sprintf("killed %s seen lost: p99 ≤ 3 intervals + 1 s (%s)", what, bound)
	if len(det) == 0 {
		why := "not measured"
		if err != nil {
			why = err.Error()
		}
		e.target(Target{Bench: 4, Claim: claim, Detail: why})
		return
	}
	d := durations(det)
	e.target(Target{Bench: 4, Claim: claim, Holds: holds(missed == 0 && d.p99() <= float64(bound.Milliseconds())),
		Detail: fmt.Sprintf("p50 %s, p99 %s, max %s over %d kills (%d undetected)", ms(d.p50()), ms(d.p99()), ms(d.max()), len(det)+missed, missed)})
}

// removals watches a registry bucket and reports when each key is removed.
type removals struct {
	mu   sync.Mutex
	at   map[string]time.Time
	stop func()
}

func watchRemovals(ctx context.Context, c *cluster, bucket string) (*removals, error) {
	kv, err := c.b.KV(ctx, bucket)
	if err != nil {
		return nil, err
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return nil, err
	}
	r := &removals{at: map[string]time.Time{}}
	wctx, cancel := context.WithCancel(ctx)
	r.stop = func() { cancel(); _ = w.Stop() }
	go func() {
		for {
			select {
			case <-wctx.Done():
				return
			case en := <-w.Updates():
				if en == nil {
					continue
				}
				if op := en.Operation(); op == jetstream.KeyValuePurge || op == jetstream.KeyValueDelete {
					r.mu.Lock()
					if _, ok := r.at[subjects.WorkerIDFromKey(en.Key())]; !ok {
						r.at[subjects.WorkerIDFromKey(en.Key())] = time.Now()
					}
					r.mu.Unlock()
				}
			}
		}
	}()
	return r, nil
}

func (r *removals) get(key string) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.at[key]
	return t, ok
}

// killBatch SIGKILLs each pid at a random moment within one interval and
// waits for their keys' removal.
func killBatch(ctx context.Context, r *removals, keys []string, pids []int, interval time.Duration) (det []time.Duration, missed int) {
	killed := make([]time.Time, len(keys))
	for i, pid := range pids {
		time.Sleep(time.Duration(rand.Int64N(int64(interval) / int64(len(pids)))))
		killed[i] = time.Now()
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	waitFor(ctx, 15*time.Second, 20*time.Millisecond, func() bool {
		for _, k := range keys {
			if _, ok := r.get(k); !ok {
				return false
			}
		}
		return true
	})
	for i, k := range keys {
		if at, ok := r.get(k); ok {
			det = append(det, at.Sub(killed[i]))
		} else {
			missed++
		}
	}
	return det, missed
}

// killRounds starts kills processes in batches with spawn, lets each batch
// beat a while, kills it with SIGKILL and times how long until each entry
// leaves the bucket r watches. afterBatch, when set, checks the queen's view
// of the batch.
func killRounds(ctx context.Context, r *removals, kills, batch int, interval time.Duration, spawn func() (string, int, error), afterBatch func([]string) error) ([]time.Duration, int, error) {
	defer r.stop()
	var det []time.Duration
	missed := 0
	for done := 0; done < kills && ctx.Err() == nil; done += batch {
		var keys []string
		var pids []int
		for i := done; i < min(done+batch, kills); i++ {
			id, pid, err := spawn()
			if err != nil {
				return det, missed, err
			}
			keys, pids = append(keys, id), append(pids, pid)
		}
		time.Sleep(2 * interval) // a few beats, as a process that has run a while
		d, m := killBatch(ctx, r, keys, pids, interval)
		det, missed = append(det, d...), missed+m
		if afterBatch != nil {
			if err := afterBatch(keys); err != nil {
				return det, missed, err
			}
		}
	}
	return det, missed, nil
}

func killHives(ctx context.Context, c *cluster, kills, batch int, interval time.Duration) ([]time.Duration, int, error) {
	r, err := watchRemovals(ctx, c, c.b.Space.HivesBucket())
	if err != nil {
		return nil, 0, err
	}
	n := 0
	spawn := func() (string, int, error) {
		id := fmt.Sprintf("kill-hive-%d", n)
		n++
		p, _, err := c.startHive(ctx, id)
		if err != nil {
			return "", 0, err
		}
		return id, p.Pid, nil
	}
	// The queen's own view must agree.
	agree := func(keys []string) error {
		for _, id := range keys {
			var v api.HiveView
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := c.b.Call(cctx, c.b.Space.Queen(api.EpHiveGet), api.HiveRequest{Name: id}, &v)
			cancel()
			if err == nil && v.State != api.HiveLost {
				return fmt.Errorf("the KV entry of killed hive %s was purged but the queen shows it %q", id, v.State)
			}
			delete(c.hives, id)
		}
		return nil
	}
	return killRounds(ctx, r, kills, batch, interval, spawn, agree)
}

// hiveWorkers returns a function spawning workers through a real hive.
func (c *cluster) hiveWorkers(ctx context.Context) (func() (string, int, error), error) {
	if _, _, err := c.startHive(ctx, "kill-workers"); err != nil {
		return nil, err
	}
	if err := c.synth(ctx, "kill-workers", "tiny", "tiny"); err != nil {
		return nil, err
	}
	return func() (string, int, error) {
		w, err := c.spawnWorker(ctx, "kill-workers", "tiny")
		return w.ID, w.PID, err
	}, nil
}

// directWorkers returns a function exec'ing workers itself, with the flags
// a hive would give them.
func (c *cluster) directWorkers(ctx context.Context) (func() (string, int, error), error) {
	bin, err := c.e.binary("llm-worker-rbee")
	if err != nil {
		return nil, err
	}
	model := filepath.Join(c.e.dir("kill-model"), "tiny.gguf")
	if err := gguf.SynthFile(model, gguf.Tiny()); err != nil {
		return nil, err
	}
	n := 0
	return func() (string, int, error) {
		n++
		id := fmt.Sprintf("kill-worker-%d", n)
		p, err := c.startWorker(ctx, bin, model, id)
		if err != nil {
			return "", 0, err
		}
		return id, p.Pid, nil
	}, nil
}

func killWorkers(ctx context.Context, c *cluster, kills, batch int, interval time.Duration, spawner func(context.Context) (func() (string, int, error), error)) ([]time.Duration, int, error) {
	spawn, err := spawner(ctx)
	if err != nil {
		return nil, 0, err
	}
	r, err := watchRemovals(ctx, c, c.b.Space.WorkersBucket())
	if err != nil {
		return nil, 0, err
	}
	det, missed, err := killRounds(ctx, r, kills, batch, interval, spawn, nil)
	if err != nil {
		return det, missed, err
	}
	// The queen's view must agree: none of the killed workers listed.
	var wl api.WorkerListReply
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.b.Call(cctx, c.b.Space.Queen(api.EpWorkerList), api.HiveRequest{}, &wl); err == nil && len(wl.Workers) > 0 {
		return det, missed, fmt.Errorf("the queen still lists %d workers after all were killed", len(wl.Workers))
	}
	return det, missed, nil
}
