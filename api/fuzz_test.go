package api_test

// Fuzz targets for the payloads the queen, hives and workers decode off the
// bus. Each target decodes untrusted bytes the way the program that accepts
// them does (encoding/json into the api type), runs the checks that follow
// the decode, and asserts that nothing panics, that what was decoded encodes
// again (the queen and the jobs store re-encode what they decoded) to a
// fixed point, and that nothing derived from the input is larger than the
// input allows. The seed corpus runs with every `go test`; fuzz one target
// with
//
//	go test -run '^$' -fuzz '^FuzzInferRequest$' -fuzztime 15s ./api/

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

var fuzzTime = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

// addJSON adds each value, encoded, to the corpus.
func addJSON(f *testing.F, vs ...any) {
	f.Helper()
	for _, v := range vs {
		data, err := json.Marshal(v)
		if err != nil {
			f.Fatalf("seed %T: %v", v, err)
		}
		f.Add(data)
	}
}

// addRaw adds hand-written inputs: the shapes json.Marshal never makes.
func addRaw(f *testing.F, raws ...string) {
	for _, r := range raws {
		f.Add([]byte(r))
	}
}

// edgeJSON are inputs every decoder must refuse or read as nothing, without
// a panic: not objects, truncated, deep, huge numbers, bad UTF-8.
var edgeJSON = []string{
	"", "null", "{}", "[]", `""`, "0", "true", "{", `{"`, `{"a":`, "\x00", "\xff\xfe",
	strings.Repeat("[", 10001) + strings.Repeat("]", 10001),
	strings.Repeat(`{"a":`, 3000) + "1" + strings.Repeat("}", 3000),
	`{"x":1e999}`, `{"x":-0}`, `{"x":"\ud800"}`, `{"x":"\u0000"}`, "{\"x\":\"\xff\"}",
}

// reencode checks that what was decoded encodes, and that encoding what that
// decodes to gives the same bytes: the queen re-encodes submitted arguments
// into records and work-queue messages, the jobs store every record it
// reads, so a value that decodes but cannot be encoded again (or changes
// each time) would wedge a job.
func reencode[T any](t *testing.T, v T) []byte {
	t.Helper()
	b1, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("decoded %T does not encode: %v", v, err)
	}
	var again T
	if err := json.Unmarshal(b1, &again); err != nil {
		t.Fatalf("%T encoded as %q does not decode: %v", v, b1, err)
	}
	b2, err := json.Marshal(again)
	if err != nil {
		t.Fatalf("re-decoded %T does not encode: %v", v, err)
	}
	if !bytes.Equal(b1, b2) {
		t.Fatalf("%T does not re-encode to a fixed point:\n%s\n%s", v, b1, b2)
	}
	return b1
}

// maxDecodedBytes bounds the text a JSON input of n bytes decodes to: an
// invalid byte becomes U+FFFD, three bytes.
func maxDecodedBytes(n int) int { return 3 * n }

// checkSampling runs the parameter rules the queen applies at admission
// (context unknown) and the worker's engine with its context, and checks
// that Validate is Problem's verdict.
func checkSampling(t *testing.T, s api.Sampling) {
	t.Helper()
	for _, ctx := range []int{0, 1, 4096, math.MaxInt} {
		param, why := s.Problem(ctx)
		err := s.Validate(ctx)
		if (param == "") != (err == nil) || (param == "") != (why == "") {
			t.Fatalf("Problem(%d) = %q, %q but Validate = %v", ctx, param, why, err)
		}
		if err != nil && (err.Reason != api.ReasonInvalidParam || err.Param != param || err.Code != api.CodeBadRequest) {
			t.Fatalf("Validate(%d) = %+v, want invalid_param %q", ctx, err, param)
		}
		if err == nil && (s.MaxTokens < 0 || ctx > 0 && s.MaxTokens > ctx) {
			t.Fatalf("max_tokens %d accepted with context %d", s.MaxTokens, ctx)
		}
	}
}

// checkArgs runs what follows the decode of inference arguments.
func checkArgs(t *testing.T, a api.InferArgs, inputLen int) {
	t.Helper()
	checkSampling(t, a.Sampling)
	if err := a.ValidatePrompt(); err != nil {
		if err.Reason != api.ReasonInvalidParam || err.Param == "" {
			t.Fatalf("ValidatePrompt = %+v, want invalid_param naming its field", err)
		}
	} else if strings.IndexByte(a.Prompt, 0) >= 0 || strings.IndexByte(a.System, 0) >= 0 {
		t.Fatalf("a prompt with a NUL byte passed: %q", a.Prompt)
	}
	if n := a.PromptBytes(); n < 0 || n > maxDecodedBytes(inputLen) {
		t.Fatalf("PromptBytes = %d from %d bytes of input", n, inputLen)
	}
	if subjects.ValidateModelID(a.Model) == nil {
		key, err := subjects.ModelKey(a.Model)
		if err != nil || subjects.ValidateID(subjects.KindModelKey, key) != nil {
			t.Fatalf("model %q is valid but its key %q is not (%v)", a.Model, key, err)
		}
	}
	if a.Hive != "" {
		_ = subjects.ValidateID(subjects.KindHive, a.Hive)
	}
}

func sampleArgs() api.InferArgs {
	seed := uint32(42)
	return api.InferArgs{
		Model: "llama-3.2-1b", Prompt: "Why is the sky blue?", System: "Answer in one sentence.",
		Messages: []api.ChatMessage{{Role: "user", Content: "hi"}, {Role: "assistant", Content: "hello \"there\" é日本\n"}},
		Sampling: api.Sampling{MaxTokens: 64, Temperature: 0.7, TopP: 0.9, TopK: 40, MinP: 0.05, RepeatPenalty: 1.1, Seed: &seed, Stop: []string{"\n\n", "</s>"}},
		Hive:     "hive-1", Device: "cuda:0", Pull: true, Source: "hf:org/repo/model.gguf",
		FirstTokenTimeout: api.Duration(30 * time.Second),
	}
}

// FuzzInferRequest: the work-queue message a worker pulls (worker/job.go:
// json.Unmarshal into api.InferRequest, then ValidateID of the job id and the
// engine's checks of the arguments), and the same arguments alone, as the
// worker's fit endpoint and the queen's stored request decode them.
func FuzzInferRequest(f *testing.F) {
	full := api.InferRequest{JobID: "01jbq8r0000000ab", Args: sampleArgs(), Attempt: 2, EnqueuedAt: fuzzTime}
	addJSON(f, full, full.Args,
		api.InferRequest{JobID: "j1", Args: api.InferArgs{Model: "tiny", Prompt: "hi"}, Attempt: 1},
		api.InferRequest{JobID: "a.b", Args: api.InferArgs{Model: "../x", Prompt: "a\x00b"}},
		api.InferRequest{JobID: strings.Repeat("j", 65), Args: api.InferArgs{Model: "m", Messages: []api.ChatMessage{{Role: " ", Content: "x"}}}},
		api.InferArgs{Model: "tiny", Sampling: api.Sampling{MaxTokens: -1, Temperature: 2.5, TopP: -1, TopK: -1, MinP: 2, RepeatPenalty: 1e7, Stop: []string{""}}},
		api.InferArgs{Model: "tiny", Prompt: "x", Sampling: api.Sampling{MaxTokens: math.MaxInt, Temperature: math.MaxFloat32}},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"job_id":"j","args":{"sampling":{"temperature":1e39}}}`,
		`{"job_id":"j","args":{"sampling":{"max_tokens":9223372036854775808}}}`,
		`{"job_id":"j","args":{"sampling":{"seed":-1}}}`,
		`{"job_id":"j","args":{"sampling":{"stop":[null,"",1]}}}`,
		`{"job_id":"j","args":{"first_token_timeout":"9999999999999h"}}`,
		`{"job_id":"j","args":{"first_token_timeout":"-2562047h47m16.854775808s"}}`,
		`{"job_id":"j","args":{"first_token_timeout":1}}`,
		`{"job_id":"j","enqueued_at":"10000-01-01T00:00:00Z"}`,
		`{"job_id":"j","enqueued_at":"9999-12-31T23:59:59-23:59"}`,
		`{"job_id":"j","attempt":-9223372036854775808}`,
		`{"job_id":"j","args":{"messages":[{"role":"user"},{}]}}`,
		`{"job_id":"j","args":{"messages":{"role":"user"}}}`,
		`{"JOB_ID":"j","Args":{"PROMPT":"case-insensitive keys"}}`,
		`{"job_id":"j","job_id":"k"}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.InferRequest
		if err := json.Unmarshal(data, &req); err == nil {
			_ = subjects.ValidateID(subjects.KindJob, req.JobID)
			checkArgs(t, req.Args, len(data))
			reencode(t, req)
		}
		var args api.InferArgs
		if err := json.Unmarshal(data, &args); err == nil {
			checkArgs(t, args, len(data))
			reencode(t, args)
		}
	})
}

// FuzzSubmitRequest: the queen's submit endpoint (bus.Handler decodes an
// api.SubmitRequest), and the arguments of each kind as the hive endpoints
// that run them decode them (api.WorkerSpawnArgs is both the worker.spawn
// operation's arguments and the hive's worker-spawn request). The queen's own
// strict decode of the arguments is fuzzed in package queen.
func FuzzSubmitRequest(f *testing.F) {
	args := func(v any) json.RawMessage {
		b, err := json.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	addJSON(f,
		api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: args(sampleArgs())}, Timeout: api.Duration(time.Minute)},
		api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop, Args: json.RawMessage(`{"sleep":"1s"}`)}},
		api.SubmitRequest{Op: api.Operation{Kind: api.OpWorkerSpawn, Args: args(api.WorkerSpawnArgs{Hive: "h1", Model: "tiny", Device: "cuda:1", Slots: 4, Ctx: 8192, Threads: 2, JobID: "j1", LoadTimeout: api.Duration(time.Minute)})}},
		api.SubmitRequest{Op: api.Operation{Kind: api.OpWorkerStop, Args: args(api.WorkerStopArgs{Worker: "w1", Grace: api.Duration(time.Second), JobID: "j1"})}},
		api.SubmitRequest{Op: api.Operation{Kind: api.OpModelDownload, Args: args(api.ModelAddArgs{Hive: "h1", Source: "https://example.com/m.gguf", Name: "m", SHA256: strings.Repeat("ab", 32), JobID: "j1"})}},
		api.SubmitRequest{Op: api.Operation{Kind: api.OpHiveStart, Args: json.RawMessage(`{"name":"h1"}`)}},
		api.SubmitRequest{Op: api.Operation{Kind: "rm -rf", Args: json.RawMessage(`[1,2]`)}, Timeout: api.Duration(-1)},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"op":{"kind":"infer","args":null}}`,
		`{"op":{"kind":"infer","args":"a string"}}`,
		`{"op":{"kind":"worker.spawn","args":{"slots":-1,"ctx":9223372036854775807,"load_timeout":"-1h"}}}`,
		`{"op":{"kind":"worker.stop","args":{"grace":"1e9h"}}}`,
		`{"op":null,"timeout":"0"}`,
		`{"op":{"kind":1}}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.SubmitRequest
		if err := json.Unmarshal(data, &req); err != nil {
			return
		}
		if len(req.Op.Args) > len(data) {
			t.Fatalf("%d bytes of arguments from %d bytes", len(req.Op.Args), len(data))
		}
		raw := req.Op.Args
		switch req.Op.Kind {
		case api.OpInfer:
			var a api.InferArgs
			if json.Unmarshal(raw, &a) == nil {
				checkArgs(t, a, len(raw))
			}
		case api.OpWorkerSpawn:
			var a api.WorkerSpawnArgs
			if json.Unmarshal(raw, &a) == nil {
				reencode(t, a)
			}
		case api.OpWorkerStop:
			var a api.WorkerStopArgs
			if json.Unmarshal(raw, &a) == nil {
				reencode(t, a)
			}
		case api.OpModelDownload:
			var a api.ModelAddArgs
			if json.Unmarshal(raw, &a) == nil {
				reencode(t, a)
			}
		}
		// The queen keeps the operation as submitted in the job record.
		reencode(t, api.Job{ID: "j", Op: req.Op, State: api.JobQueued, CreatedAt: fuzzTime})
		reencode(t, req)
	})
}

// FuzzEndpointRequests: the other requests the queen's and the hives'
// endpoints decode with bus.Handler, each followed by the id checks their
// handlers apply.
func FuzzEndpointRequests(f *testing.F) {
	addJSON(f,
		api.WorkerSpawnArgs{Hive: "h1", Model: "llama-3.2-1b", Device: "cpu", Slots: 2, Ctx: 2048},
		api.WorkerStopArgs{Worker: "w-tiny-1", Grace: api.Duration(5 * time.Second)},
		api.ModelAddArgs{Hive: "h1", Source: "file:///m.gguf", Name: "m.v1"},
		api.ModelSynthArgs{Name: "tiny", Size: "large"},
		api.ModelRequest{Model: "tiny", Force: true},
		api.ShutdownRequest{JobID: "j1"},
		api.JobRequest{ID: "01jbq8r0000000ab"},
		api.JobListRequest{State: api.JobRunning, Limit: 50, Before: "01jbq8r0000000ab"},
		api.HiveAddRequest{Name: "gpu-box", SSH: "me@host:2222", IdentityFile: "~/.ssh/id", BinDir: "/opt/rbee/bin", Prefix: "~/.local"},
		api.HiveRequest{Name: "gpu-box"},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"model":"..","name":".hidden","hive":"a.b","worker":"*","id":">","job_id":"a b"}`,
		`{"state":"bogus","limit":-1,"before":"\u0000"}`,
		`{"grace":"-1ns","load_timeout":"1.5h","slots":1e3}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		ids := func(kind subjects.Kind, ids ...string) {
			for _, id := range ids {
				_ = subjects.ValidateID(kind, id)
			}
		}
		var spawn api.WorkerSpawnArgs
		if json.Unmarshal(data, &spawn) == nil {
			ids(subjects.KindHive, spawn.Hive)
			ids(subjects.KindJob, spawn.JobID)
			_ = subjects.ValidateModelID(spawn.Model)
			reencode(t, spawn)
		}
		var stop api.WorkerStopArgs
		if json.Unmarshal(data, &stop) == nil {
			ids(subjects.KindWorker, stop.Worker)
			reencode(t, stop)
		}
		var add api.ModelAddArgs
		if json.Unmarshal(data, &add) == nil {
			ids(subjects.KindHive, add.Hive)
			_ = subjects.ValidateModelID(add.Name)
			reencode(t, add)
		}
		var synth api.ModelSynthArgs
		if json.Unmarshal(data, &synth) == nil {
			_ = subjects.ValidateModelID(synth.Name)
		}
		var model api.ModelRequest
		if json.Unmarshal(data, &model) == nil {
			_ = subjects.ValidateModelID(model.Model)
		}
		var shutdown api.ShutdownRequest
		_ = json.Unmarshal(data, &shutdown)
		var job api.JobRequest
		if json.Unmarshal(data, &job) == nil {
			ids(subjects.KindJob, job.ID)
		}
		var list api.JobListRequest
		if json.Unmarshal(data, &list) == nil {
			_ = list.State.Valid()
			_ = list.State.Terminal()
		}
		var hiveAdd api.HiveAddRequest
		if json.Unmarshal(data, &hiveAdd) == nil {
			ids(subjects.KindHive, hiveAdd.Name)
		}
		var hive api.HiveRequest
		if json.Unmarshal(data, &hive) == nil {
			ids(subjects.KindHive, hive.Name)
		}
	})
}

// FuzzHeartbeats: the registry entries the queen (queen/registry.go) and the
// hives (hive/workers.go) decode from the hives and workers buckets, and the
// inventory entries the queen reads back.
func FuzzHeartbeats(f *testing.F) {
	caps := api.Capabilities{
		Hostname: "box", OS: "linux", Arch: "amd64", CPU: api.CPU{Model: "EPYC", Cores: 16, Threads: 32},
		RAMTotal: 64 << 30, RAMFree: 32 << 30, Backends: []string{"cpu", "cuda"},
		GPUs:       []api.GPU{{Index: 0, Name: "H200", VRAMTotal: 141 << 30, VRAMFree: 140 << 30, ComputeCapability: "9.0", Driver: "560"}},
		DetectedAt: fuzzTime,
	}
	addJSON(f,
		api.HiveStatus{ID: "h1", Version: "v1", PID: 42, StartedAt: fuzzTime, BeatAt: fuzzTime, Capabilities: caps, RAMFree: 1 << 30,
			Workers: []string{"w1", "w2"}, Models: []api.ModelBrief{{ID: "llama-3.2-1b", Key: "llama-3_2-1b-0a1b2c3d", EstimatedMemory: 1 << 30}}, LogPath: "/var/log/h1"},
		api.WorkerStatus{ID: "w1", Hive: "h1", Model: "tiny", ModelKey: "tiny", Device: "cuda:0", SlotsTotal: 4, SlotsBusy: 1, ContextSize: 4096,
			KVCacheBytes: 1 << 28, KVUsedBytes: 1 << 20, MemoryUsed: 1 << 30, State: api.WorkerBusy, TokensServed: 1e6, TokensPerSec: 123.5,
			PID: 7, Version: "v1", StartedAt: fuzzTime, BeatAt: fuzzTime},
		api.InventoryEntry{Name: "gpu", SSH: &api.SSHTarget{Spec: "me@host:22", IdentityFile: "/k"}, BinDir: "/b", Prefix: "/p", AddedAt: fuzzTime},
		api.InventoryEntry{Name: "local"},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"ram_free":18446744073709551616}`,
		`{"ram_free":-1,"slots_total":-1,"tokens_per_sec":1e308}`,
		`{"workers":null,"models":[null,{}],"capabilities":{"gpus":[{"index":-1}]}}`,
		`{"ssh":null}`, `{"ssh":{}}`, `{"beat_at":"0000-01-01T00:00:00Z"}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		var hive api.HiveStatus
		if json.Unmarshal(data, &hive) == nil {
			reencode(t, hive)
		}
		var worker api.WorkerStatus
		if json.Unmarshal(data, &worker) == nil {
			reencode(t, worker)
		}
		var entry api.InventoryEntry
		if json.Unmarshal(data, &entry) == nil {
			_ = entry.Address()
			reencode(t, entry)
		}
	})
}

// FuzzDuration: every duration on the bus (timeouts, graces, a worker's
// drain request) is an api.Duration.
func FuzzDuration(f *testing.F) {
	for _, s := range []string{"1m30s", "0", "0s", "-1ns", "1.5h", "300ms", "1µs", "1us", "9223372036854775807ns",
		"9223372036854775808ns", "-9223372036854775808ns", "-2562047h47m16.854775808s", "2562047h47m16.854775807s",
		"1e3s", "1", "", ".s", "1.s", "+5m", "1h-1m", "\x00", "99999999999999999999h"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var d api.Duration
		if err := d.UnmarshalText(data); err != nil {
			return
		}
		text, err := d.MarshalText()
		if err != nil {
			t.Fatalf("%q decoded to %d, which does not encode: %v", data, d, err)
		}
		var again api.Duration
		if err := again.UnmarshalText(text); err != nil || again != d {
			t.Fatalf("%q decoded to %d, encoded as %q, decoded again to %d (%v)", data, d, text, again, err)
		}
		// The JSON form, as every request carries it.
		quoted, _ := json.Marshal(string(data))
		var inJSON struct {
			D api.Duration `json:"d"`
		}
		if err := json.Unmarshal([]byte(`{"d":`+string(quoted)+`}`), &inJSON); err != nil || inJSON.D != d {
			t.Fatalf("%q as JSON decoded to %d (%v), as text to %d", data, inJSON.D, err, d)
		}
	})
}

// FuzzToken: a job's token message, lone or a chunk, as a follower decodes
// it (bus.DecodeEvent, then Len and At to split a chunk). A chunk's size is
// the number of texts it holds; ids beyond them are ignored and missing ones
// read as 0, so no length in the message can make a follower allocate more
// than the message holds.
func FuzzToken(f *testing.F) {
	addJSON(f,
		api.Token{Index: 0, ID: 15043, Text: "Hello"},
		api.Token{Index: 7, ID: 1, Text: " a", More: []string{" b", "\"c\"", "é", "\n"}, MoreIDs: []int32{2, 3, 4, 5}, Attempt: 2},
		api.Token{Index: 3, Text: "x", More: []string{"y", "z"}, MoreIDs: []int32{9}},
		api.Token{Index: 3, Text: "x", More: []string{"y"}, MoreIDs: []int32{9, 10, 11, 12}},
		api.Token{Index: math.MaxInt, Text: "last", More: []string{"overflow"}},
		api.Token{Index: -5, ID: -1, Text: "", Attempt: -1},
		api.Token{Index: math.MaxInt - api.MaxChunkTokens, Text: "a", More: make([]string, api.MaxChunkTokens-1)},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"i":0,"t":"a","more":null,"more_ids":null}`,
		`{"i":0,"t":"a","more":[],"more_ids":[1,2,3]}`,
		`{"i":0,"t":"a","more":["b",null,"c"]}`,
		`{"i":0,"t":"a","more_ids":[2147483648]}`,
		`{"i":9223372036854775807,"t":"a","more":["b","c"]}`,
		`{"i":1e3}`,
		`{"i":0,"more":[`+strings.Repeat(`"",`, 2000)+`""]}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		var tok api.Token
		if err := json.Unmarshal(data, &tok); err != nil {
			return
		}
		n := tok.Len()
		if n != 1+len(tok.More) {
			t.Fatalf("Len = %d with %d more texts", n, len(tok.More))
		}
		// What a follower accepts (bus.DecodeEvent) is a chunk a
		// publisher could have sent.
		if tok.Validate() == nil && (n > api.MaxChunkTokens || tok.Index < 0 || tok.Index+n < tok.Index || len(tok.MoreIDs) > len(tok.More)) {
			t.Fatalf("Validate accepted index %d, %d texts, %d ids", tok.Index, n, len(tok.MoreIDs))
		}
		// Each text after the first takes at least `"",` in the input.
		if n-1 > len(data)/2 {
			t.Fatalf("Len = %d from %d bytes", n, len(data))
		}
		for k := range n {
			one := tok.At(k)
			if one.More != nil || one.MoreIDs != nil || one.Attempt != tok.Attempt || one.Index != tok.Index+k {
				t.Fatalf("At(%d) = %+v of %+v", k, one, tok)
			}
			wantText, wantID := tok.Text, tok.ID
			if k > 0 {
				wantText, wantID = tok.More[k-1], 0
				if k-1 < len(tok.MoreIDs) {
					wantID = tok.MoreIDs[k-1]
				}
			}
			if one.Text != wantText || one.ID != wantID {
				t.Fatalf("At(%d) = %q/%d, want %q/%d", k, one.Text, one.ID, wantText, wantID)
			}
		}
		reencode(t, tok)
	})
}

// FuzzStateChange: a job's state event, as followers (bus.Follow, the
// keeper, the gateway) and the queen's metrics decode it, with the error
// (Err) a failed or cancelled job ends with and the InferResult a completed
// infer job carries.
func FuzzStateChange(f *testing.F) {
	res, _ := json.Marshal(api.InferResult{StopReason: "eos", PromptTokens: 12, CompletionTokens: 34, TimeToFirstToken: api.Duration(50 * time.Millisecond),
		Duration: api.Duration(time.Second), TokensPerSecond: 34, Worker: "w1", Hive: "h1", Attempt: 1})
	actor := api.Actor{Component: "worker", ID: "w1"}
	addJSON(f,
		api.StateChange{Time: fuzzTime, From: api.JobRunning, State: api.JobCompleted, Actor: actor, Hive: "h1", Worker: "w1", Attempt: 1, Result: res},
		api.StateChange{Time: fuzzTime, From: api.JobRunning, State: api.JobFailed, Actor: actor, Error: "invalid max_tokens", Reason: api.ReasonInvalidParam, Param: "max_tokens"},
		api.StateChange{Time: fuzzTime, From: api.JobQueued, State: api.JobCancelled, Actor: actor},
		api.StateChange{From: api.JobRunning, State: api.JobQueued, Attempt: math.MaxInt},
		api.StateChange{State: "exploded", Reason: "made-up"},
	)
	addRaw(f, edgeJSON...)
	addRaw(f,
		`{"state":"completed","result":{"prompt_tokens":"many"}}`,
		`{"state":"completed","result":[1,2,3]}`,
		`{"state":"completed","result":null}`,
		`{"state":"failed","reason":""}`,
		`{"time":"2025-13-01T00:00:00Z"}`,
	)
	f.Fuzz(func(t *testing.T, data []byte) {
		var st api.StateChange
		if err := json.Unmarshal(data, &st); err != nil {
			return
		}
		ev := api.Event{Kind: "state", State: &st}
		if ev.Terminal() != st.State.Terminal() {
			t.Fatalf("Terminal disagrees for %q", st.State)
		}
		e := st.Err()
		ends := st.State == api.JobFailed || st.State == api.JobCancelled
		if (e != nil) != ends {
			t.Fatalf("Err() = %v for state %q", e, st.State)
		}
		if e != nil && (e.Reason == "" || e.Code != api.CodeOfReason(e.Reason) || api.ReasonOf(e) != e.Reason) {
			t.Fatalf("Err() = %+v: its reason and code disagree", e)
		}
		if len(st.Result) > 0 {
			var r api.InferResult
			if json.Unmarshal(st.Result, &r) == nil {
				reencode(t, r)
			}
		}
		reencode(t, st)
	})
}

// FuzzNarration: a narration event, as the keeper prints it and cluster
// narration subscribers read it; Fields is free-form JSON.
func FuzzNarration(f *testing.F) {
	addJSON(f,
		api.Narration{Time: fuzzTime, Level: "info", Actor: api.Actor{Component: "hive", ID: "h1"}, Action: "spawn", Target: "w1",
			Human: "starting worker w1", JobID: "j1", HiveID: "h1", WorkerID: "w1",
			Fields: map[string]any{"bytes": 123.0, "done": true, "nested": map[string]any{"a": []any{1.0, "b", nil}}}},
		api.Narration{Human: ""},
	)
	addRaw(f, edgeJSON...)
	addRaw(f, `{"fields":{"a":1e308,"b":-0,"c":"\ud83d\ude00","d":[[[[[]]]]]}}`, `{"fields":[]}`, `{"actor":"queen"}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		var n api.Narration
		if err := json.Unmarshal(data, &n); err != nil {
			return
		}
		reencode(t, n)
	})
}
