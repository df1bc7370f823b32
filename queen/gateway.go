package queen

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// gateway is the OpenAI-compatible HTTP server. It is a client of the
// queen like the keeper is: every completion is a job submitted through
// q.submit and followed on the bus, so it shows in `rbee jobs list` and can
// be traced and cancelled like any other.
//
// Endpoints:
//
//	GET  /v1/models               models on online hives and live workers
//	GET  /v1/models/{model}       one of them
//	POST /v1/chat/completions     chat, streaming (SSE) or not
//	POST /v1/completions          raw prompt, streaming (SSE) or not
//	GET  /healthz                 "ok" while the gateway serves
//	GET  /metrics                 Prometheus text format
type gateway struct {
	q       *Queen
	srv     *http.Server
	metrics *metrics
	// addr is the bound address (a configured port 0 is resolved).
	addr string
	// ctx is the base of every request's context. Shutdown cancels it, so
	// in-flight completions cancel their jobs and return instead of
	// holding the shutdown until their generation ends.
	ctx    context.Context
	cancel context.CancelFunc
	served chan struct{}
}

// maxRequestBody bounds a request body; a chat history larger than this
// does not fit any model rbee runs.
const maxRequestBody = 8 << 20

func startGateway(q *Queen, addr string) (*gateway, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("gateway: listen on %s: %w", addr, err)
	}
	m := newMetrics(q)
	if err := m.watch(); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("gateway: watch job states for metrics: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := &gateway{q: q, metrics: m, addr: ln.Addr().String(), ctx: ctx, cancel: cancel, served: make(chan struct{})}
	g.srv = &http.Server{
		Handler:           g.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// No WriteTimeout: a stream lasts as long as its generation.
		BaseContext: func(net.Listener) context.Context { return ctx },
		ErrorLog:    log.New(q.log, "gateway: ", 0),
	}
	go func() {
		defer close(g.served)
		if err := g.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			q.log.Error().Err(err).Msg("gateway stopped serving")
		}
	}()
	return g, nil
}

// shutdown stops accepting requests, cancels the jobs of in-flight
// completions (their handlers answer and return), and waits for them
// within ctx. The metrics watcher stops with it.
func (g *gateway) shutdown(ctx context.Context) {
	g.cancel()
	if err := g.srv.Shutdown(ctx); err != nil {
		g.q.log.Warn().Err(err).Msg("gateway requests did not finish in time")
		_ = g.srv.Close()
	}
	select {
	case <-g.served:
	case <-ctx.Done():
	}
	g.metrics.stop()
}

// GatewayURL is the base URL of the OpenAI-compatible gateway
// ("http://127.0.0.1:7833"), or "" when the gateway is off. OpenAI clients
// take GatewayURL()+"/v1" as their base URL.
func (q *Queen) GatewayURL() string {
	if q.gateway == nil {
		return ""
	}
	return "http://" + q.gateway.addr
}

func (g *gateway) routes() http.Handler {
	mux := http.NewServeMux()
	// /healthz and /metrics stay open even with an API key: probes and
	// scrapers rarely carry one, and neither reveals prompts or output.
	// Everything under /v1/ (which runs models) requires the key.
	healthz := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok"))
	})
	routes := []struct {
		method, path, endpoint string
		h                      http.Handler
		open                   bool // served without the API key
	}{
		{http.MethodGet, "/healthz", "healthz", healthz, true},
		{http.MethodGet, "/metrics", "metrics", g.metrics.handler(), true},
		{http.MethodGet, "/v1/models", "models", http.HandlerFunc(g.listModels), false},
		{http.MethodGet, "/v1/models/{model}", "models", http.HandlerFunc(g.getModel), false},
		{http.MethodPost, "/v1/chat/completions", "chat_completions", http.HandlerFunc(g.chatCompletions), false},
		{http.MethodPost, "/v1/completions", "completions", http.HandlerFunc(g.completions), false},
	}
	for _, rt := range routes {
		h := rt.h
		if !rt.open {
			h = g.authorized(h)
		}
		if rt.endpoint != "metrics" { // the metrics handler counts itself
			h = g.count(rt.endpoint, h)
		}
		mux.Handle(rt.method+" "+rt.path, h)
		// Any other method on the path is a 405 that says which one
		// works, in OpenAI's error shape (the mux's own is plain text,
		// and the catch-all below would make it a 404).
		allow := rt.method
		if rt.method == http.MethodGet {
			allow = "GET, HEAD"
		}
		mux.Handle(rt.path, g.count(rt.endpoint, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, api.Fail(reasonMethodNotAllowed, "", "method %s is not allowed on %s; use %s", r.Method, r.URL.Path, rt.method))
		})))
	}
	mux.Handle("/v1/", g.count("other", g.authorized(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Fail(api.ReasonNotFound, "", "invalid URL (%s %s): rbee serves /v1/models, /v1/chat/completions and /v1/completions", r.Method, r.URL.Path))
	}))))
	return mux
}

// authorized enforces the API key when one is configured. The scheme is
// matched without regard to case, as RFC 9110 says: "bearer KEY" is as good
// as "Bearer KEY".
func (g *gateway) authorized(next http.Handler) http.Handler {
	key := g.q.cfg.APIKey
	if key == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, got, _ := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(key)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="rbee"`)
			writeError(w, api.Fail(reasonUnauthorized, "", "missing or wrong API key; send it as `Authorization: Bearer KEY` (the key the queen was started with: --api-key or RBEE_API_KEY)"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// count records every answered request in rbee_gateway_requests_total.
func (g *gateway) count(endpoint string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		g.metrics.requests.WithLabelValues(endpoint, strconv.Itoa(rec.status)).Inc()
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the real writer to flush.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// --- errors ---

// openAIError is OpenAI's error body: {"error":{"message","type","param","code"}}.
type openAIError struct {
	Error openAIErrorBody `json:"error"`
}

type openAIErrorBody struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

// Reasons only the gateway gives: they concern HTTP, not a job.
const (
	reasonUnauthorized     api.Reason = "unauthorized"
	reasonMethodNotAllowed api.Reason = "method_not_allowed"
	// reasonUnsupportedParam: an OpenAI parameter rbee does not honour.
	reasonUnsupportedParam api.Reason = "unsupported_param"
)

// httpError is how an error of one reason is answered over HTTP: a status,
// and OpenAI's error type and code ("" answers a null code).
type httpError struct {
	status    int
	typ, code string
}

// httpErrors is the one table from reason to HTTP answer. The statuses
// steer OpenAI clients, which retry 408, 409, 429 and 5xx by themselves:
// what the client got wrong is a 4xx they do not retry; what may work on a
// second try (a lost worker, no capacity yet) is retried.
var httpErrors = map[api.Reason]httpError{
	api.ReasonInvalidRequest:  {http.StatusBadRequest, "invalid_request_error", ""},
	api.ReasonInvalidParam:    {http.StatusBadRequest, "invalid_request_error", ""},
	reasonUnsupportedParam:    {http.StatusBadRequest, "invalid_request_error", "unsupported_parameter"},
	api.ReasonPromptTooLong:   {http.StatusBadRequest, "invalid_request_error", "context_length_exceeded"},
	reasonUnauthorized:        {http.StatusUnauthorized, "invalid_request_error", "invalid_api_key"},
	api.ReasonNotFound:        {http.StatusNotFound, "invalid_request_error", ""},
	reasonMethodNotAllowed:    {http.StatusMethodNotAllowed, "invalid_request_error", ""},
	api.ReasonConflict:        {http.StatusConflict, "invalid_request_error", ""},
	api.ReasonCancelled:       {http.StatusConflict, "server_error", "cancelled"},
	api.ReasonPayloadTooLarge: {http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large"},
	api.ReasonQueueFull:       {http.StatusTooManyRequests, "rate_limit_error", "queue_full"},
	api.ReasonInternal:        {http.StatusInternalServerError, "server_error", ""},
	api.ReasonWorkerLost:      {http.StatusBadGateway, "server_error", "worker_lost"},
	api.ReasonNoCapacity:      {http.StatusServiceUnavailable, "server_error", "no_capacity"},
	api.ReasonUnavailable:     {http.StatusServiceUnavailable, "server_error", "unavailable"},
	api.ReasonTimeout:         {http.StatusGatewayTimeout, "timeout_error", "timeout"},
}

// httpErrorOf is the table's row for e (internal for a reason it lacks).
func httpErrorOf(e *api.Error) httpError {
	h, ok := httpErrors[e.Reason]
	if !ok {
		h = httpErrors[api.ReasonInternal]
	}
	if e.Reason == api.ReasonNotFound && e.Param == "model" {
		h.code = "model_not_found"
	}
	return h
}

// errorBody builds the error OpenAI clients expect for e.
func errorBody(e *api.Error) openAIError {
	h := httpErrorOf(e)
	body := openAIError{Error: openAIErrorBody{Message: e.Message, Type: h.typ}}
	if e.Param != "" {
		body.Error.Param = &e.Param
	}
	if h.code != "" {
		body.Error.Code = &h.code
	}
	return body
}

// writeError answers err with its reason's status and OpenAI's error body.
func writeError(w http.ResponseWriter, err error) {
	e := api.AsError(err)
	writeJSON(w, httpErrorOf(e).status, errorBody(e))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// --- models ---

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

// models lists what a request could run now: the catalogs of online hives
// (asked over the bus, and from their heartbeats, which is what admission
// checks, so a hive slow to answer does not hide its models) and the
// models live workers serve. Deduplicated by id, sorted.
func (g *gateway) models(ctx context.Context) []modelObject {
	seen := map[string]modelObject{}
	add := func(id string, created time.Time) {
		if id == "" {
			return
		}
		if created.IsZero() {
			created = g.q.started
		}
		if m, ok := seen[id]; !ok || created.Unix() < m.Created {
			seen[id] = modelObject{ID: id, Object: "model", Created: created.Unix(), OwnedBy: "rbee"}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	catalogs, err := g.q.modelList(ctx, api.HiveRequest{})
	if err != nil {
		g.q.log.Warn().Err(err).Msg("gateway: listing hive catalogs")
	}
	for _, c := range catalogs {
		for _, m := range c.Models {
			add(m.ID, m.AddedAt)
		}
	}
	snap := g.q.registry.Snapshot()
	for _, h := range snap.Hives {
		if h.State != api.HiveOnline {
			continue
		}
		for _, m := range h.Status.Models {
			add(m.ID, time.Time{})
		}
	}
	for _, w := range snap.Workers {
		add(w.Model, w.StartedAt)
	}
	out := make([]modelObject, 0, len(seen))
	for _, m := range seen {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (g *gateway) listModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, modelList{Object: "list", Data: g.models(r.Context())})
}

func (g *gateway) getModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("model")
	for _, m := range g.models(r.Context()) {
		if m.ID == id {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	writeError(w, api.Fail(api.ReasonNotFound, "model", "model %s is not on any online hive and no worker serves it", id))
}
