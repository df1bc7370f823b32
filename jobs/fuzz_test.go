package jobs_test

// FuzzJobRecord fuzzes the decoder of job records (jobs.Decode), which the
// queen's scheduler watch, the job endpoints, List, Walk and every
// transition run on what the jobs bucket holds, and what follows a decode:
// the state machine, the state event the record announces (Job.Change), and
// the write back (a transition re-encodes the record it read). Run it with
//
//	go test -run '^$' -fuzz '^FuzzJobRecord$' -fuzztime 15s ./jobs/

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
)

// entry is a jobs bucket entry as a watcher or Get hands it over.
type entry struct {
	key   string
	value []byte
	rev   uint64
}

func (e entry) Bucket() string                  { return "rbee_jobs" }
func (e entry) Key() string                     { return e.key }
func (e entry) Value() []byte                   { return e.value }
func (e entry) Revision() uint64                { return e.rev }
func (e entry) Created() time.Time              { return time.Time{} }
func (e entry) Delta() uint64                   { return 0 }
func (e entry) Operation() jetstream.KeyValueOp { return jetstream.KeyValuePut }

var states = []api.JobState{"", api.JobQueued, api.JobRunning, api.JobCompleted, api.JobFailed, api.JobCancelled, "exploded"}

func FuzzJobRecord(f *testing.F) {
	at := time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)
	later := at.Add(time.Minute)
	args, _ := json.Marshal(api.InferArgs{Model: "tiny", Prompt: "Why is the sky blue?…", Sampling: api.Sampling{MaxTokens: 16}})
	result, _ := json.Marshal(api.InferResult{StopReason: "length", PromptTokens: 7, CompletionTokens: 16, Duration: api.Duration(time.Second), Worker: "w1", Hive: "h1"})
	for _, job := range []api.Job{
		{ID: "01jbq8r0000000ab", Op: api.Operation{Kind: api.OpInfer, Args: args}, State: api.JobQueued, CreatedAt: at, Deadline: &later,
			Prompt: &api.PromptInfo{Bytes: 4096, SHA256: strings.Repeat("ab", 32), Truncated: true}},
		{ID: "01jbq8r0000000ab", Op: api.Operation{Kind: api.OpInfer, Args: args}, State: api.JobRunning, CreatedAt: at, StartedAt: &at, Hive: "h1", Worker: "w1", Attempts: 2},
		{ID: "01jbq8r0000000ab", Op: api.Operation{Kind: api.OpInfer, Args: args}, State: api.JobCompleted, CreatedAt: at, StartedAt: &at, FinishedAt: &later, Attempts: 1, Result: result},
		{ID: "j2", Op: api.Operation{Kind: api.OpWorkerSpawn}, State: api.JobFailed, CreatedAt: at, FinishedAt: &later,
			Error: "invalid max_tokens: must be at least 1", Reason: api.ReasonInvalidParam, Param: "max_tokens"},
		{ID: "j3", Op: api.Operation{Kind: api.OpNoop}, State: api.JobCancelled, Error: "cancelled by user"},
		{ID: "j4", State: "exploded", Reason: "made-up", Attempts: -1},
	} {
		data, err := json.Marshal(job)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(job.ID, data, uint64(3))
	}
	for _, raw := range []string{
		"", "null", "{}", "[]", "{", "\xff", `{"id":1}`, `{"op":"infer"}`, `{"op":{"args":"x"}}`,
		`{"state":"completed","result":{"a":[1,2,{"b":null}]}}`, `{"state":"completed","result":null}`,
		`{"started_at":null,"finished_at":"0000-01-01T00:00:00Z","deadline":"9999-12-31T23:59:59.999999999+23:59"}`,
		`{"attempts":9223372036854775808}`, `{"prompt":{"bytes":-1}}`, `{"prompt":null}`,
		strings.Repeat(`{"op":`, 5000) + "{}" + strings.Repeat("}", 5000),
	} {
		f.Add("j1", []byte(raw), uint64(0))
	}
	actor := api.Actor{Component: "fuzz"}
	f.Fuzz(func(t *testing.T, key string, value []byte, rev uint64) {
		job, err := jobs.Decode(entry{key: key, value: value, rev: rev})
		if err != nil {
			return
		}
		if job.Revision != rev {
			t.Fatalf("Revision = %d, want the entry's %d", job.Revision, rev)
		}
		// A transition writes back the record it read: it must encode, to
		// a fixed point.
		b1, err := json.Marshal(job)
		if err != nil {
			t.Fatalf("a decoded record does not encode: %v", err)
		}
		again, err := jobs.Decode(entry{key: key, value: b1, rev: rev})
		if err != nil {
			t.Fatalf("a re-encoded record %q does not decode: %v", b1, err)
		}
		if b2, _ := json.Marshal(again); !bytes.Equal(b1, b2) {
			t.Fatalf("the record does not re-encode to a fixed point:\n%s\n%s", b1, b2)
		}
		for _, to := range states {
			err := jobs.CheckTransition(job.State, to)
			switch {
			case !to.Valid() && !errors.Is(err, jobs.ErrIllegalTransition):
				t.Fatalf("%q → unknown %q: %v", job.State, to, err)
			case to.Valid() && job.State.Terminal() && !errors.Is(err, jobs.ErrTerminal):
				t.Fatalf("terminal %q → %q: %v", job.State, to, err)
			}
		}
		for _, from := range states {
			ev := job.Change(from, actor, at)
			if ev.State != job.State || ev.From != from || ev.Attempt != job.Attempts || ev.Error != job.Error || ev.Reason != job.Reason {
				t.Fatalf("Change(%q) = %+v of %+v", from, ev, job)
			}
			if job.State.Terminal() != bytes.Equal(ev.Result, job.Result) && len(job.Result) > 0 {
				t.Fatalf("Change of a %q record carries result %q", job.State, ev.Result)
			}
			if e := ev.Err(); e != nil && (e.Reason == "" || e.Message != job.Error) {
				t.Fatalf("the event's error %+v of record error %q", e, job.Error)
			}
			// The store publishes the event it made.
			if _, err := json.Marshal(ev); err != nil {
				t.Fatalf("the state event of a decoded record does not encode: %v", err)
			}
		}
	})
}
