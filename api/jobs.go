// Package api holds the messages that travel on the rbee bus: job records
// and events, operations, registry heartbeats. Every component encodes and
// decodes them as JSON, so a `nats sub 'rbee.>'` trace is readable.
package api

import (
	"encoding/json"
	"fmt"
	"math"
	"time"
)

// JobState is where a job is in its life. Transitions are checked by the
// jobs package; a terminal state is final.
type JobState string

const (
	JobQueued    JobState = "queued"
	JobRunning   JobState = "running"
	JobCompleted JobState = "completed"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// Terminal reports whether no further transition is possible.
func (s JobState) Terminal() bool {
	return s == JobCompleted || s == JobFailed || s == JobCancelled
}

// Valid reports whether s is one of the known states.
func (s JobState) Valid() bool {
	switch s {
	case JobQueued, JobRunning, JobCompleted, JobFailed, JobCancelled:
		return true
	}
	return false
}

// Job is the record of one job, kept in the jobs KV bucket.
type Job struct {
	ID         string     `json:"id"`
	Op         Operation  `json:"op"`
	State      JobState   `json:"state"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at,omitempty"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	// Deadline is when the queen fails the job if it is still not terminal.
	Deadline *time.Time `json:"deadline,omitempty"`
	// Error says why a failed or cancelled job ended, for the person;
	// Reason says it for programs, and Param names the request parameter
	// at fault, if any (see Error).
	Error  string `json:"error,omitempty"`
	Reason Reason `json:"reason,omitempty"`
	Param  string `json:"param,omitempty"`
	// Hive and Worker say where the job ran, once known.
	Hive   string `json:"hive,omitempty"`
	Worker string `json:"worker,omitempty"`
	// Attempts is the number of the attempt that runs (or last ran) the
	// job: 1 for its first worker, one more for each retry. Events of an
	// older attempt are stale: the record and followers ignore them.
	Attempts int `json:"attempts,omitempty"`
	// Prompt describes an infer job's prompt, whose text the record keeps
	// only as an excerpt (Op.Args): the whole request is stored once on
	// the job's request subject.
	Prompt *PromptInfo `json:"prompt,omitempty"`
	// Result is the operation's outcome (an InferResult for infer jobs).
	Result json.RawMessage `json:"result,omitempty"`
	// Revision is the KV revision this record was read at (not stored).
	Revision uint64 `json:"-"`
}

// PromptInfo is what a job record says of a prompt it does not hold whole.
type PromptInfo struct {
	// Bytes is the size of the prompt, system text and messages together.
	Bytes int `json:"bytes"`
	// SHA256 is the hex digest of the request's arguments as submitted.
	SHA256 string `json:"sha256"`
	// Truncated says whether the record's copy was shortened.
	Truncated bool `json:"truncated,omitempty"`
}

// Operation is what a job does: a kind and its JSON arguments.
type Operation struct {
	Kind string          `json:"kind"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Operation kinds submitted as jobs.
const (
	OpInfer         = "infer"
	OpHiveStart     = "hive.start"
	OpHiveStop      = "hive.stop"
	OpHiveInstall   = "hive.install"
	OpHiveUninstall = "hive.uninstall"
	OpWorkerSpawn   = "worker.spawn"
	OpWorkerStop    = "worker.stop"
	OpModelDownload = "model.download"
	// OpNoop is a job that does nothing but narrate and complete; it
	// exercises the job flow end to end without any hive.
	OpNoop = "noop"
)

// Actor says which component did something.
type Actor struct {
	Component string `json:"component"`
	ID        string `json:"id,omitempty"`
}

// Narration is one human-readable step of a job (or of the cluster), for
// the person who ran the command. It is not a log line: logs are for
// operators and go to the component's log.
type Narration struct {
	Time     time.Time      `json:"time"`
	Level    string         `json:"level"`
	Actor    Actor          `json:"actor"`
	Action   string         `json:"action"`
	Target   string         `json:"target,omitempty"`
	Human    string         `json:"human"`
	JobID    string         `json:"job_id,omitempty"`
	HiveID   string         `json:"hive_id,omitempty"`
	WorkerID string         `json:"worker_id,omitempty"`
	Fields   map[string]any `json:"fields,omitempty"`
}

// Token is one generated piece of text, or a chunk of consecutive ones.
//
// A publisher faster than the bus sends the tokens that accumulated while
// its previous message was in flight as one message: Index, ID and Text are
// then the first token's, and More (texts) and MoreIDs (ids) hold the tokens
// at Index+1, Index+2, ... A lone token has neither, so its message reads as
// it did before chunks. Followers (bus.Follow) never see a chunk: they get
// one event per token, each with its own Index, ID and Text.
type Token struct {
	// Index counts tokens of this job from 0; followers use it to check
	// order and completeness.
	Index int    `json:"i"`
	ID    int32  `json:"id"`
	Text  string `json:"t"`
	// More and MoreIDs carry the rest of a chunk, in index order; a
	// missing id reads as 0, and there are never more ids than texts
	// (Validate).
	More    []string `json:"more,omitempty"`
	MoreIDs []int32  `json:"more_ids,omitempty"`
	// Attempt is the job attempt that generated the token (0: unknown,
	// never stale). A follower drops tokens of an attempt the job's state
	// events have moved past.
	Attempt int `json:"a,omitempty"`
}

// MaxChunkTokens bounds the tokens one token message carries, its first
// and the rest of its chunk. Publishers (bus.TokenPublisher) send no larger
// chunk and followers refuse one (Validate), so no message can make a
// follower split it into more tokens than this, whatever it holds.
const MaxChunkTokens = 1024

// Validate reports whether t is a token message as publishers make it: an
// Index of 0 or more, at most MaxChunkTokens tokens, no more ids than texts,
// and indices that do not overflow, the last one's or the next a follower
// expects after it. Followers (bus.DecodeEvent) refuse any other.
func (t Token) Validate() error {
	switch {
	case t.Index < 0:
		return fmt.Errorf("token index %d is negative", t.Index)
	case len(t.More) >= MaxChunkTokens:
		return fmt.Errorf("a chunk of %d tokens is larger than %d", t.Len(), MaxChunkTokens)
	case len(t.MoreIDs) > len(t.More):
		return fmt.Errorf("a chunk of %d tokens has %d ids for its %d more texts", t.Len(), len(t.MoreIDs), len(t.More))
	case t.Index > math.MaxInt-t.Len():
		return fmt.Errorf("token index %d and the %d tokens of its chunk overflow", t.Index, t.Len())
	}
	return nil
}

// Len is the number of tokens t carries: 1, plus the rest of a chunk.
func (t Token) Len() int { return 1 + len(t.More) }

// At returns the k-th token t carries (0 is the first, k < Len()) as a
// lone token.
func (t Token) At(k int) Token {
	if k == 0 {
		return Token{Index: t.Index, ID: t.ID, Text: t.Text, Attempt: t.Attempt}
	}
	one := Token{Index: t.Index + k, Text: t.More[k-1], Attempt: t.Attempt}
	if k-1 < len(t.MoreIDs) {
		one.ID = t.MoreIDs[k-1]
	}
	return one
}

// StateChange is published on a job's state subject for every transition.
type StateChange struct {
	Time  time.Time `json:"time"`
	From  JobState  `json:"from,omitempty"`
	State JobState  `json:"state"`
	Actor Actor     `json:"actor"`
	Error string    `json:"error,omitempty"`
	// Reason and Param are the record's (see Job): set on the terminal
	// event of a failed or cancelled job.
	Reason Reason `json:"reason,omitempty"`
	Param  string `json:"param,omitempty"`
	Hive   string `json:"hive,omitempty"`
	Worker string `json:"worker,omitempty"`
	// Attempt is the record's attempt number after the change: a running
	// event names the attempt that started, a retry (running → queued)
	// the attempt that was given up.
	Attempt int             `json:"attempt,omitempty"`
	Result  json.RawMessage `json:"result,omitempty"`
}

// Change is the state event that announces the record as it is now, moved
// from state from by actor: the one way a state event is made from a
// record (by the jobs store after each write, and by a follower that finds
// the record ended while the stream lacks its end).
func (j Job) Change(from JobState, actor Actor, at time.Time) StateChange {
	ev := StateChange{
		Time: at, From: from, State: j.State, Actor: actor,
		Error: j.Error, Reason: j.Reason, Param: j.Param, Hive: j.Hive, Worker: j.Worker, Attempt: j.Attempts,
	}
	if j.State.Terminal() {
		ev.Result = j.Result
	}
	return ev
}

// Event is one stored event of a job as a follower sees it.
type Event struct {
	// Seq is the stream sequence: resume after it with --from Seq+1.
	Seq       uint64       `json:"seq"`
	Kind      string       `json:"kind"`
	Narration *Narration   `json:"narration,omitempty"`
	Token     *Token       `json:"token,omitempty"`
	State     *StateChange `json:"state,omitempty"`
}

// Terminal reports whether e ends its job's stream.
func (e Event) Terminal() bool { return e.State != nil && e.State.State.Terminal() }

// GiveUp is the body of a message on a job's cancel subject that ends one
// attempt of the job rather than the job: the leader judged the attempt's
// worker lost and records what happens to the job next itself (queued
// again, or failed with Error). A worker that runs that very attempt after
// all (it was only slow or cut off) stops it and records nothing, so its
// end cannot read "cancelled" where nobody cancelled; a worker running any
// other attempt goes on. An empty body cancels the job, whatever attempt
// runs (what a person sending it by hand means).
type GiveUp struct {
	Attempt int    `json:"attempt"`
	Error   *Error `json:"error,omitempty"`
}
