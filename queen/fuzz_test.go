package queen

// Fuzz targets for the decoders that live unexported in the queen: the
// strict decode of a submitted operation's arguments (decodeArgs, per kind,
// with what admission checks before any hive is asked), the excerpt a job
// record keeps of an infer request, the scheduler's and the metrics' reads
// of a record, and the OpenAI gateway's request bodies, which become the
// infer arguments it submits. Fuzz one with
//
//	go test -run '^$' -fuzz '^FuzzSubmitArgs$' -fuzztime 15s ./queen/

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

func fuzzJSON(tb testing.TB, v any) json.RawMessage {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// checkAdmission runs the checks admitInfer makes before it looks at the
// registry, on strictly decoded arguments.
func checkAdmission(t *testing.T, raw json.RawMessage, a api.InferArgs) {
	t.Helper()
	err := validateInfer(a)
	if err != nil {
		if e := api.AsError(err); e.Reason != api.ReasonInvalidParam || e.Param == "" {
			t.Fatalf("validateInfer refused with %+v, want invalid_param naming its field", e)
		}
		return
	}
	if subjects.ValidateModelID(a.Model) != nil || a.ValidatePrompt() != nil || a.Sampling.Validate(0) != nil {
		t.Fatalf("validateInfer passed %+v", a)
	}
	if _, err := subjects.ModelKey(a.Model); err != nil {
		t.Fatalf("an admitted model %q has no key: %v", a.Model, err)
	}
	for _, ctx := range []int{1, 4096, math.MaxInt} {
		_ = mayNotFit(a, ctx)
	}
	// The record keeps an excerpt; the worker gets the whole request.
	ex, info := excerpt(raw, a)
	kept, err := decodeArgs[api.InferArgs](ex)
	if err != nil {
		t.Fatalf("the record's excerpt %q does not decode: %v", ex, err)
	}
	if info.Bytes != a.PromptBytes() {
		t.Fatalf("the excerpt says %d prompt bytes, the request has %d", info.Bytes, a.PromptBytes())
	}
	cut := len("…")
	if len(kept.Prompt) > excerptPrompt+cut || len(kept.System) > excerptMessage+cut || len(kept.Messages) > excerptMessages+1 {
		t.Fatalf("the excerpt keeps %d+%d bytes and %d messages", len(kept.Prompt), len(kept.System), len(kept.Messages))
	}
	for _, m := range kept.Messages {
		if len(m.Role) > 32+cut || len(m.Content) > excerptMessage+cut {
			t.Fatalf("the excerpt keeps a message of %d+%d bytes", len(m.Role), len(m.Content))
		}
	}
	if !info.Truncated && !bytes.Equal(fuzzJSON(t, kept), fuzzJSON(t, a)) {
		t.Fatalf("an excerpt that says nothing was cut differs:\n%s\n%s", fuzzJSON(t, kept), fuzzJSON(t, a))
	}
	if utf8.ValidString(a.Prompt) && !utf8.ValidString(kept.Prompt) {
		t.Fatalf("the excerpt cut a rune: %q", kept.Prompt)
	}
	// What enqueue puts on the work queue, as the worker decodes it.
	msg := fuzzJSON(t, api.InferRequest{JobID: "01jbq8r0000000ab", Args: a, Attempt: 1, EnqueuedAt: time.Unix(1700000000, 0).UTC()})
	var req api.InferRequest
	if err := json.Unmarshal(msg, &req); err != nil || !bytes.Equal(fuzzJSON(t, req.Args), fuzzJSON(t, a)) {
		t.Fatalf("the worker reads the request %q as %+v (%v)", msg, req.Args, err)
	}
	// The scheduler's and the metrics' reads of the record.
	job := api.Job{ID: "01jbq8r0000000ab", Op: api.Operation{Kind: api.OpInfer, Args: ex}, State: api.JobQueued}
	if sj := schedJob(job); sj.Model != a.Model {
		t.Fatalf("the scheduler reads model %q from a record of %q", sj.Model, a.Model)
	}
}

// FuzzSubmitArgs: a submit request (bus.Handler decodes it with
// json.Unmarshal), then its arguments as admission decodes them per kind.
func FuzzSubmitArgs(f *testing.F) {
	seed := uint32(1)
	long := strings.Repeat("é", 400) + "x"
	infer := api.InferArgs{
		Model: "llama-3.2-1b", Prompt: "Why is the sky blue?", System: "Be brief.",
		Messages: []api.ChatMessage{{Role: "user", Content: "hi"}, {Role: "assistant", Content: "hello"}},
		Sampling: api.Sampling{MaxTokens: 32, Temperature: 0.8, TopP: 0.95, TopK: 40, MinP: 0.05, RepeatPenalty: 1.1, Seed: &seed, Stop: []string{"\n"}},
		Hive:     "h1", Device: "cuda:0", FirstTokenTimeout: api.Duration(10 * time.Second),
	}
	many := infer
	many.Prompt, many.System = long+long, long
	for range 20 {
		many.Messages = append(many.Messages, api.ChatMessage{Role: strings.Repeat("r", 40), Content: long})
	}
	for _, req := range []api.SubmitRequest{
		{Op: api.Operation{Kind: api.OpInfer, Args: fuzzJSON(f, infer)}, Timeout: api.Duration(time.Minute)},
		{Op: api.Operation{Kind: api.OpInfer, Args: fuzzJSON(f, many)}},
		{Op: api.Operation{Kind: api.OpInfer, Args: fuzzJSON(f, api.InferArgs{Model: "tiny", Prompt: "x", Pull: true, Source: "hf:o/r/f.gguf"})}},
		{Op: api.Operation{Kind: api.OpInfer, Args: json.RawMessage(`{"model":"tiny","prompt":"x","unknown":1}`)}},
		{Op: api.Operation{Kind: api.OpNoop, Args: json.RawMessage(`{"sleep":"50ms"}`)}},
		{Op: api.Operation{Kind: api.OpWorkerSpawn, Args: fuzzJSON(f, api.WorkerSpawnArgs{Hive: "h1", Model: "tiny", Slots: 2})}},
		{Op: api.Operation{Kind: api.OpWorkerStop, Args: fuzzJSON(f, api.WorkerStopArgs{Worker: "w1"})}},
		{Op: api.Operation{Kind: api.OpModelDownload, Args: fuzzJSON(f, api.ModelAddArgs{Hive: "h1", Source: "https://x/m.gguf"})}},
		{Op: api.Operation{Kind: api.OpHiveStart, Args: json.RawMessage(`{"name":"h1"}`)}},
		{Op: api.Operation{Kind: api.OpHiveInstall, Args: json.RawMessage(`{"name":"a.b"}`)}},
	} {
		f.Add([]byte(fuzzJSON(f, req)))
	}
	for _, s := range []string{"", "{}", `{"op":{"kind":"infer"}}`, `{"op":{"kind":"infer","args":{"model":"tiny","prompt":"x"} {"trailing":1}}}`, `{"op":{"kind":"infer","args":null}}`, `{"op":{"kind":"infer","args":[]}}`,
		`{"op":{"kind":"infer","args":{"model":"tiny","prompt":"a","sampling":{"stop":["",null]}}}}`,
		`{"op":{"kind":"infer","args":{"model":"tiny","messages":[{"role":"user","content":"a\u0000"}]}}}`,
		`{"op":{"kind":"infer","args":{"model":"tiny","prompt":"` + strings.Repeat(`\ud83d\ude00`, 200) + `"}}}`,
		`{"op":{"kind":"noop","args":{"sleep":"-1h"}}}`} {
		f.Add([]byte(s))
	}
	ops := (&Queen{}).operations() // only the admissions that need no queen are called
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.SubmitRequest
		if json.Unmarshal(data, &req) != nil {
			return
		}
		raw := req.Op.Args
		switch req.Op.Kind {
		case api.OpInfer:
			a, err := decodeArgs[api.InferArgs](raw)
			if err != nil {
				if api.ReasonOf(err) != api.ReasonInvalidRequest {
					t.Fatalf("a malformed request is %v", err)
				}
				return
			}
			checkAdmission(t, raw, a)
		case api.OpHiveStart, api.OpHiveStop, api.OpHiveInstall, api.OpHiveUninstall:
			if a, err := decodeArgs[hiveArgs](raw); err == nil {
				_ = subjects.ValidateID(subjects.KindHive, a.Name)
			}
		default:
			op, ok := ops[req.Op.Kind]
			if !ok {
				return
			}
			if err := op.admit(t.Context(), raw); err != nil && api.ReasonOf(err) != api.ReasonInvalidRequest {
				t.Fatalf("%s admission refused with %v", req.Op.Kind, err)
			}
		}
	})
}

// FuzzGatewayRequest: an OpenAI chat or completions body, as the gateway
// decodes and checks it, and the infer arguments it then submits, which the
// queen's own strict decode must take.
func FuzzGatewayRequest(f *testing.F) {
	for _, s := range []struct {
		body string
		chat bool
	}{
		{`{"model":"tiny","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"max_tokens":16,"temperature":0.2,"stream":true,"stream_options":{"include_usage":true}}`, true},
		{`{"model":"tiny","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"stop":["\n","."],"seed":42}`, true},
		{`{"model":"tiny","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, true},
		{`{"model":"tiny","messages":[{"role":"tool","content":null}],"tools":[],"n":1,"logprobs":false}`, true},
		{`{"model":"tiny","messages":[],"response_format":{"type":"json_object"}}`, true},
		{`{"model":"tiny","prompt":"Once upon a time","max_completion_tokens":8,"top_k":40,"min_p":0.1,"repeat_penalty":1.1}`, false},
		{`{"model":"tiny","prompt":["one"],"stop":"END","user":"me"}`, false},
		{`{"model":"tiny","prompt":[1,2,3]}`, false},
		{`{"model":"tiny","prompt":"x","seed":-1,"max_tokens":0}`, false},
		{`{"model":"tiny","prompt":"x","seed":4294967296,"n":2}`, false},
		{`{"model":"tiny","prompt":"x"} {"model":"again"}`, false},
		{`{"model":"../x","prompt":"a\u0000b","temperature":1e39}`, false},
		{``, true}, {`null`, true}, {`[]`, false}, {`{"stop":{}}`, true},
	} {
		f.Add([]byte(s.body), s.chat)
	}
	f.Fuzz(func(t *testing.T, body []byte, chat bool) {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, "/v1/completions", bytes.NewReader(body))
		var args api.InferArgs
		var err error
		if chat {
			var req chatRequest
			if !decodeRequest(w, r, &req, chatParams) {
				checkRefusal(t, w)
				return
			}
			args, err = req.inferArgs()
		} else {
			var req completionRequest
			if !decodeRequest(w, r, &req, textParams) {
				checkRefusal(t, w)
				return
			}
			args, err = req.inferArgs()
		}
		if err != nil {
			writeError(w, err)
			checkRefusal(t, w)
			return
		}
		// complete submits the arguments as an infer operation.
		raw, err := json.Marshal(args)
		if err != nil {
			t.Fatalf("the gateway's arguments do not encode: %v", err)
		}
		a, err := decodeArgs[api.InferArgs](raw)
		if err != nil {
			t.Fatalf("the queen refuses the gateway's arguments %s: %v", raw, err)
		}
		checkAdmission(t, raw, a)
	})
}

// checkRefusal checks that the gateway answered a bad body with a 4xx and
// an OpenAI error body, never a 5xx.
func checkRefusal(t *testing.T, w *httptest.ResponseRecorder) {
	t.Helper()
	if w.Code < 400 || w.Code >= 500 {
		t.Fatalf("a refused body answered %d: %s", w.Code, w.Body)
	}
	var body openAIError
	if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || body.Error.Message == "" {
		t.Fatalf("a refusal's body %q is not an OpenAI error (%v)", w.Body, err)
	}
}
