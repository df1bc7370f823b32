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
	mux.Handle("GET /healthz", g.count("healthz", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok"))
	})))
	mux.Handle("GET /metrics", g.metrics.handler())
	mux.Handle("GET /v1/models", g.count("models", g.authorized(http.HandlerFunc(g.listModels))))
	mux.Handle("GET /v1/models/{model}", g.count("models", g.authorized(http.HandlerFunc(g.getModel))))
	mux.Handle("POST /v1/chat/completions", g.count("chat_completions", g.authorized(http.HandlerFunc(g.chatCompletions))))
	mux.Handle("POST /v1/completions", g.count("completions", g.authorized(http.HandlerFunc(g.completions))))
	mux.Handle("/v1/", g.count("other", g.authorized(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "", fmt.Sprintf("invalid URL (%s %s): rbee serves /v1/models, /v1/chat/completions and /v1/completions", r.Method, r.URL.Path))
	}))))
	return mux
}

// authorized enforces the API key when one is configured.
func (g *gateway) authorized(next http.Handler) http.Handler {
	key := g.q.cfg.APIKey
	if key == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(key)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="rbee"`)
			writeError(w, http.StatusUnauthorized, "", "missing or wrong API key; send it as `Authorization: Bearer KEY` (the key the queen was started with: --api-key or RBEE_API_KEY)")
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

// errorBody builds the error OpenAI clients expect for an HTTP status.
// The type and code strings follow OpenAI's where it has one for the case.
func errorBody(status int, param, msg string) openAIError {
	typ, code := "server_error", ""
	switch status {
	case http.StatusBadRequest:
		typ = "invalid_request_error"
	case http.StatusUnauthorized:
		typ, code = "invalid_request_error", "invalid_api_key"
	case http.StatusNotFound:
		typ = "invalid_request_error"
		if param == "model" {
			code = "model_not_found"
		}
	case http.StatusRequestEntityTooLarge:
		typ, code = "invalid_request_error", "request_too_large"
	case http.StatusTooManyRequests:
		typ, code = "rate_limit_error", "queue_full"
	case http.StatusServiceUnavailable:
		typ, code = "server_error", "no_capacity"
	case http.StatusGatewayTimeout:
		typ, code = "timeout_error", "timeout"
	}
	body := openAIError{Error: openAIErrorBody{Message: msg, Type: typ}}
	if param != "" {
		body.Error.Param = &param
	}
	if code != "" {
		body.Error.Code = &code
	}
	return body
}

func writeError(w http.ResponseWriter, status int, param, msg string) {
	writeJSON(w, status, errorBody(status, param, msg))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// statusOf maps an error from submitting a job to an HTTP status: the
// queen's codes are HTTP codes already; anything without one is a 500.
func statusOf(err error) int {
	switch code := api.CodeOf(err); code {
	case api.CodeBadRequest, api.CodeNotFound, api.CodeQueueFull, api.CodeUnavailable, api.CodeTimeout:
		return code
	}
	return http.StatusInternalServerError
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
	writeError(w, http.StatusNotFound, "model", fmt.Sprintf("model %s is not on any online hive and no worker serves it", id))
}
