package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/rbee-dev/rbee/internal/gguf"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/subjects"
)

// benchFootprint measures each program's start-up time and idle memory.
func benchFootprint(ctx context.Context, e *env) (*Table, error) {
	runs := 5
	idle := 2 * time.Second
	if e.opts.Quick {
		runs, idle = 3, time.Second
	}
	t := &Table{
		Intro:  fmt.Sprintf("Start-up is from exec to ready; idle RSS is VmRSS %s after ready with nothing to do. %d starts each; medians (max in brackets).", idle, runs),
		Header: []string{"program", "ready means", "start-up p50 (max)", "idle RSS p50 (max)"},
	}
	row := func(name, means string, st []time.Duration, rs []uint64) {
		var r sample
		for _, v := range rs {
			r = append(r, float64(v))
		}
		d := durations(st)
		t.Rows = append(t.Rows, []string{name, means, fmt.Sprintf("%s (%s)", ms(d.p50()), ms(d.max())), fmt.Sprintf("%s (%s)", mib(uint64(r.p50())), mib(uint64(r.max())))})
	}
	var errs []string

	// The queen with its embedded bus and the gateway, as `rbee queen start` runs it.
	var st []time.Duration
	var rs []uint64
	for i := 0; i < runs && ctx.Err() == nil; i++ {
		c, d, err := e.startQueen(ctx, queenSpec{Gateway: true})
		if err != nil {
			return t, err
		}
		time.Sleep(idle)
		if v, err := rss(c.queen.Pid); err == nil {
			st, rs = append(st, d), append(rs, v)
		}
		c.close()
	}
	row("queen-rbee (embedded nats-server + JetStream, gateway on)", "its `status` endpoint answers on the bus", st, rs)

	// Hives and workers on one queen.
	c, _, err := e.startQueen(ctx, queenSpec{})
	if err != nil {
		return t, err
	}
	defer c.close()
	st, rs = nil, nil
	var hive *process
	for i := 0; i < runs && ctx.Err() == nil; i++ {
		id := fmt.Sprintf("fp%d", i)
		p, d, err := c.startHive(ctx, id)
		if err != nil {
			errs = append(errs, "rbee-hive: "+err.Error())
			break
		}
		time.Sleep(idle)
		if v, err := rss(p.Pid); err == nil {
			st, rs = append(st, d), append(rs, v)
		}
		if i < runs-1 {
			p.stop(10 * time.Second)
			delete(c.hives, id)
		} else {
			hive = p
		}
	}
	if len(st) > 0 {
		row("rbee-hive (default heartbeat)", "its first heartbeat is in KV `rbee_hives`", st, rs)
	} else {
		t.Rows = append(t.Rows, []string{"rbee-hive", "—", "not measured", "not measured"})
	}
	_ = hive
	// Workers are started here directly, with the flags a hive gives them,
	// so exec is the bench's own.
	bin, err := e.binary("llm-worker-rbee")
	if err != nil {
		t.Rows = append(t.Rows, []string{"llm-worker-rbee", "—", "not measured", "not measured"})
		t.Notes = append(t.Notes, append(errs, err.Error())...)
		return t, nil
	}
	model := filepath.Join(e.dir("fp-model"), "tiny.gguf")
	if err := gguf.SynthFile(model, gguf.Tiny()); err != nil {
		return t, err
	}
	var loadSt, readySt []time.Duration
	var loadRSS, readyRSS []uint64
	for i := 0; i < runs && ctx.Err() == nil; i++ {
		r, err := workerExec(ctx, c, bin, model, fmt.Sprintf("fpw%d", i), idle)
		if err != nil {
			errs = append(errs, "llm-worker-rbee: "+err.Error())
			break
		}
		if r.loadingRSS > 0 {
			loadSt, loadRSS = append(loadSt, r.loading), append(loadRSS, r.loadingRSS)
		}
		readySt, readyRSS = append(readySt, r.ready), append(readyRSS, r.idleRSS)
	}
	if len(loadSt) > 0 {
		row("llm-worker-rbee before its model is loaded", "its entry in KV `rbee_workers` in state `loading` (registered before the load); RSS at that moment", loadSt, loadRSS)
	} else {
		t.Rows = append(t.Rows, []string{"llm-worker-rbee without a model", "—", "not measured", "not measured"})
	}
	if len(readySt) > 0 {
		row("llm-worker-rbee with the tiny model (1 slot, 1 thread, context 2048)", "its entry in KV `rbee_workers` in state `ready`", readySt, readyRSS)
	} else {
		t.Rows = append(t.Rows, []string{"llm-worker-rbee with the tiny model", "—", "not measured", "not measured"})
	}
	t.Notes = append(t.Notes, "The worker always loads a model; \"without a model\" is the same process caught in state `loading`, after it connected and registered but before llama.cpp loaded the weights.",
		"Workers are exec'd by the bench with the flags a hive passes (`--id --hive --model --model-path --threads 1 --slots 1 --ctx 2048 --nats`), so the time is the worker's own, without the hive's spawn path.")
	t.Notes = append(t.Notes, errs...)
	return t, nil
}

type workerFootprint struct {
	loading, ready      time.Duration
	loadingRSS, idleRSS uint64
}

// workerExec starts a worker and times its registry entries.
func workerExec(ctx context.Context, c *cluster, bin, model, id string, idle time.Duration) (workerFootprint, error) {
	var r workerFootprint
	const hive = "fp"
	kv, err := c.b.KV(ctx, c.b.Space.WorkersBucket())
	if err != nil {
		return r, err
	}
	watch, err := kv.Watch(ctx, subjects.WorkerKey(hive, id), jetstream.UpdatesOnly())
	if err != nil {
		return r, err
	}
	defer func() { _ = watch.Stop() }()
	args := []string{"--id", id, "--hive", hive, "--model", "tiny", "--model-path", model, "--threads", "1", "--slots", "1", "--ctx", "2048", "--nats", c.natsURL}
	cr, err := c.issue(auth.WorkerName(hive, id), auth.Principal{Role: auth.RoleWorker, Hive: hive, Worker: id, ModelKey: "tiny"})
	if err != nil {
		return r, err
	}
	args = append(args, cr...)
	p, err := c.e.procs.start("llm-worker-rbee "+id, bin, args, nil, filepath.Join(c.home, "logs", id+".log"))
	if err != nil {
		return r, err
	}
	defer p.stop(10 * time.Second)
	timer := time.NewTimer(60 * time.Second)
	defer timer.Stop()
	for r.ready == 0 {
		select {
		case en := <-watch.Updates():
			if en == nil || en.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st api.WorkerStatus
			if jsonUnmarshal(en.Value(), &st) != nil {
				continue
			}
			switch {
			case st.State == api.WorkerLoading && r.loading == 0:
				r.loading = time.Since(p.Started)
				r.loadingRSS, _ = rss(p.Pid)
			case st.State != api.WorkerLoading:
				r.ready = time.Since(p.Started)
			}
		case <-p.Done():
			return r, fmt.Errorf("worker exited before it was ready: %v; %s", p.err, logTail(p))
		case <-timer.C:
			return r, fmt.Errorf("worker not ready within 60 s; %s", logTail(p))
		case <-ctx.Done():
			return r, ctx.Err()
		}
	}
	time.Sleep(idle)
	r.idleRSS, err = rss(p.Pid)
	return r, err
}

// startWorker execs a worker with the flags a hive gives it and waits until
// it is ready.
func (c *cluster) startWorker(ctx context.Context, bin, model, id string) (*process, error) {
	const hive = "bench"
	kv, err := c.b.KV(ctx, c.b.Space.WorkersBucket())
	if err != nil {
		return nil, err
	}
	watch, err := kv.Watch(ctx, subjects.WorkerKey(hive, id), jetstream.UpdatesOnly())
	if err != nil {
		return nil, err
	}
	defer func() { _ = watch.Stop() }()
	args := []string{"--id", id, "--hive", hive, "--model", "tiny", "--model-path", model, "--threads", "1", "--slots", "1", "--ctx", "2048", "--nats", c.natsURL}
	cr, err := c.issue(auth.WorkerName(hive, id), auth.Principal{Role: auth.RoleWorker, Hive: hive, Worker: id, ModelKey: "tiny"})
	if err != nil {
		return nil, err
	}
	args = append(args, cr...)
	p, err := c.e.procs.start("llm-worker-rbee "+id, bin, args, nil, filepath.Join(c.home, "logs", id+".log"))
	if err != nil {
		return nil, err
	}
	timer := time.NewTimer(60 * time.Second)
	defer timer.Stop()
	for {
		select {
		case en := <-watch.Updates():
			var st api.WorkerStatus
			if en != nil && en.Operation() == jetstream.KeyValuePut && jsonUnmarshal(en.Value(), &st) == nil && st.State == api.WorkerReady {
				return p, nil
			}
		case <-p.Done():
			return nil, fmt.Errorf("worker %s exited: %v; %s", id, p.err, logTail(p))
		case <-timer.C:
			p.stop(time.Second)
			return nil, fmt.Errorf("worker %s not ready within 60 s; %s", id, logTail(p))
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
