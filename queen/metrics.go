package queen

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// metrics is what the queen exposes to Prometheus on the gateway's /metrics.
// Cluster state (jobs, queues, hives, workers) is read at scrape time from
// the same sources `rbee status` uses, so it can never drift from them;
// only the latency histograms are accumulated, from the results of
// completed inference jobs seen on the bus.
//
// It has its own registry, not the process-global one, so two queens in
// one process (tests) do not collide and nothing else leaks into it.
type metrics struct {
	q        *Queen
	registry *prometheus.Registry
	ttft     *prometheus.HistogramVec
	tps      *prometheus.HistogramVec
	requests *prometheus.CounterVec
	// sub watches every job's state subject for completed inferences; the
	// gateway owns it and stops it at shutdown.
	sub *nats.Subscription
}

func newMetrics(q *Queen) *metrics {
	m := &metrics{
		q:        q,
		registry: prometheus.NewRegistry(),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rbee_time_to_first_token_seconds",
			Help:    "Time from a worker taking an inference job to its first token, per model.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14), // 10 ms … 82 s
		}, []string{"model"}),
		tps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rbee_tokens_per_second",
			Help:    "Generation speed of completed inference jobs, per model.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12), // 1 … 2048
		}, []string{"model"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_gateway_requests_total",
			Help: "HTTP requests answered by the OpenAI-compatible gateway, by endpoint and status code.",
		}, []string{"endpoint", "code"}),
	}
	m.registry.MustRegister(m.ttft, m.tps, m.requests, &clusterCollector{q: q})
	return m
}

// handler serves the registry in the Prometheus text format. A source that
// fails during a scrape (the bus is briefly away) drops its own families,
// not the whole scrape.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// observeResult records one completed inference of model.
func (m *metrics) observeResult(model string, r api.InferResult) {
	if r.TimeToFirstToken > 0 {
		m.ttft.WithLabelValues(model).Observe(time.Duration(r.TimeToFirstToken).Seconds())
	}
	if r.TokensPerSecond > 0 {
		m.tps.WithLabelValues(model).Observe(r.TokensPerSecond)
	}
}

// watch observes every inference that completes in the cluster, whoever
// submitted it (gateway, keeper, another queen): workers finish jobs, not
// the queen, so the state events on the bus are the one place all
// completions pass. With several queens each one observes every job; that
// is each queen's view of the cluster, not a sum to add up.
func (m *metrics) watch() error {
	subject := stateWildcard(m.q.bus.Space)
	sub, err := m.q.bus.NC.Subscribe(subject, m.onState)
	if err != nil {
		return err
	}
	m.sub = sub
	return nil
}

// stateWildcard is the subject matching every job's state events, taken
// from the contract's stream subjects rather than spelled here.
func stateWildcard(space subjects.Space) string {
	for _, s := range space.JobsStreamSubjects() {
		if strings.HasSuffix(s, "."+string(subjects.EventState)) {
			return s
		}
	}
	panic("subjects: the jobs stream captures no state subject")
}

func (m *metrics) onState(msg *nats.Msg) {
	id, kind, ok := m.q.bus.Space.JobIDFromSubject(msg.Subject)
	if !ok || kind != subjects.EventState {
		return
	}
	var ev api.StateChange
	if err := json.Unmarshal(msg.Data, &ev); err != nil || ev.State != api.JobCompleted || len(ev.Result) == 0 {
		return
	}
	// The event does not say which operation completed, and the result
	// alone does not say which model ran; the record says both.
	ctx, cancel := context.WithTimeout(m.q.runCtx, 5*time.Second)
	defer cancel()
	job, err := m.q.jobs.Get(ctx, id)
	if err != nil || job.Op.Kind != api.OpInfer {
		return
	}
	args, err := decodeArgs[api.InferArgs](job.Op.Args)
	if err != nil {
		return
	}
	var res api.InferResult
	if err := json.Unmarshal(ev.Result, &res); err != nil {
		return
	}
	m.observeResult(args.Model, res)
}

func (m *metrics) stop() {
	if m.sub != nil {
		_ = m.sub.Unsubscribe()
	}
}

// clusterCollector reports cluster state at scrape time.
type clusterCollector struct{ q *Queen }

var (
	descJobs = prometheus.NewDesc("rbee_jobs",
		"Job records currently kept, by state (finished records age out with the job event retention).",
		[]string{"state"}, nil)
	descQueueDepth = prometheus.NewDesc("rbee_queue_depth",
		"Inference requests waiting on a model's work queue for a worker slot.",
		[]string{"model"}, nil)
	descHives = prometheus.NewDesc("rbee_hives",
		"Hives known to the queen (inventory and bus), by state.",
		[]string{"state"}, nil)
	descWorkersOnline = prometheus.NewDesc("rbee_workers_online",
		"Workers with a live heartbeat.", nil, nil)
	descSlotsBusy = prometheus.NewDesc("rbee_worker_slots_busy",
		"Inference slots busy across all live workers.", nil, nil)
	descSlotsTotal = prometheus.NewDesc("rbee_worker_slots_total",
		"Inference slots across all live workers.", nil, nil)
	descLeader = prometheus.NewDesc("rbee_queen_leader",
		"1 while this queen leads (holds the scheduler lease and runs the scheduler), 0 while it stands by.",
		[]string{"queen"}, nil)
	descLeaseEpoch = prometheus.NewDesc("rbee_queen_lease_epoch",
		"The scheduler lease's revision when this queen's current term as the leader began (0 while standing by).",
		[]string{"queen"}, nil)
)

func (c *clusterCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descJobs, descQueueDepth, descHives, descWorkersOnline, descSlotsBusy, descSlotsTotal, descLeader, descLeaseEpoch} {
		ch <- d
	}
}

func (c *clusterCollector) Collect(ch chan<- prometheus.Metric) {
	q := c.q
	ctx, cancel := context.WithTimeout(q.runCtx, 5*time.Second)
	defer cancel()

	if counts, err := q.jobs.Counts(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descJobs, err)
	} else {
		for _, s := range []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted, api.JobFailed, api.JobCancelled} {
			ch <- prometheus.MustNewConstMetric(descJobs, prometheus.GaugeValue, float64(counts[s]), string(s))
		}
	}

	// Every model the cluster knows gets a series, at zero when nothing
	// waits, so a dashboard does not see series come and go.
	depths := map[string]int{}
	for _, model := range q.registry.Snapshot().modelNames() {
		depths[model] = 0
	}
	for model, n := range q.queueDepths(ctx) {
		depths[model] += n
	}
	for model, n := range depths {
		ch <- prometheus.MustNewConstMetric(descQueueDepth, prometheus.GaugeValue, float64(n), model)
	}

	if views, err := q.hiveViews(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descHives, err)
	} else {
		hives := map[string]int{api.HiveOnline: 0, api.HiveLost: 0, api.HiveOffline: 0}
		for _, v := range views {
			hives[v.State]++
		}
		for state, n := range hives {
			ch <- prometheus.MustNewConstMetric(descHives, prometheus.GaugeValue, float64(n), state)
		}
	}

	snap := q.registry.Snapshot()
	busy, total := 0, 0
	for _, w := range snap.Workers {
		busy += w.SlotsBusy
		total += w.SlotsTotal
	}
	ch <- prometheus.MustNewConstMetric(descWorkersOnline, prometheus.GaugeValue, float64(len(snap.Workers)))
	ch <- prometheus.MustNewConstMetric(descSlotsBusy, prometheus.GaugeValue, float64(busy))
	ch <- prometheus.MustNewConstMetric(descSlotsTotal, prometheus.GaugeValue, float64(total))

	leading, epoch := 0.0, 0.0
	if t := q.term.Load(); t != nil {
		leading, epoch = 1, float64(t.epoch)
	}
	ch <- prometheus.MustNewConstMetric(descLeader, prometheus.GaugeValue, leading, q.id)
	ch <- prometheus.MustNewConstMetric(descLeaseEpoch, prometheus.GaugeValue, epoch, q.id)
}
