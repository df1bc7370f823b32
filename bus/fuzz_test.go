package bus

// Fuzz targets for what the bus package decodes on behalf of every program:
// job events as Follow reads them (DecodeEvent, splitChunk, tokenOrder), the
// requests bus.Handler decodes for every endpoint of the queen, the hives
// and the workers, and the error headers Call rebuilds an *api.Error from.
// The seed corpus runs with every `go test`; fuzz one target with
//
//	go test -run '^$' -fuzz '^FuzzDecodeEvent$' -fuzztime 15s ./bus/

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// fuzzJob is the job whose subjects the event targets use.
const fuzzJob = "01jbq8r0000000ab"

func mustJSON(tb testing.TB, v any) []byte {
	tb.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return data
}

// eventMsg is a stored message of job on subject kind, as DecodeEvent sees
// it from a consumer or a direct stream read.
func eventMsg(subject string, seq uint64, data []byte) jetstream.Msg {
	return storedMsg{&jetstream.RawStreamMsg{Subject: subject, Sequence: seq, Data: data}}
}

func eventSubject(kind subjects.EventKind) string {
	return subjects.Default().Namespace() + ".job." + fuzzJob + "." + string(kind)
}

func fuzzChunk(first int, attempt int, texts ...string) api.Token {
	toks := make([]api.Token, len(texts))
	for k, s := range texts {
		toks[k] = api.Token{Index: first + k, ID: int32(first + k), Text: s, Attempt: attempt}
	}
	return chunk(toks)
}

// checkSplit checks what Follow makes of one decoded event: one event per
// token, each a lone token at its own index, and never more of them than a
// chunk may carry, whatever the message claims.
func checkSplit(t *testing.T, ev api.Event, split []api.Event) {
	t.Helper()
	if len(split) > maxChunkTokens {
		t.Fatalf("one message made %d events (a chunk carries at most %d tokens)", len(split), maxChunkTokens)
	}
	if ev.Token == nil {
		if len(split) != 1 {
			t.Fatalf("an event without a token split into %d", len(split))
		}
		return
	}
	if len(split) != ev.Token.Len() {
		t.Fatalf("a chunk of %d tokens split into %d events", ev.Token.Len(), len(split))
	}
	for k, one := range split {
		tk := one.Token
		if tk == nil || len(tk.More) != 0 || len(tk.MoreIDs) != 0 || tk.Index != ev.Token.Index+k || one.Seq != ev.Seq {
			t.Fatalf("event %d of a split chunk is %+v (token %+v)", k, one, tk)
		}
		if tk.Index < 0 {
			t.Fatalf("a follower was handed token index %d", tk.Index)
		}
	}
}

// FuzzDecodeEvent: one stored job event (narration, token or chunk, state)
// on any subject, decoded and split as Follow does before ordering.
func FuzzDecodeEvent(f *testing.F) {
	narration := mustJSON(f, api.Narration{Time: time.Unix(1700000000, 0).UTC(), Level: "info", Actor: api.Actor{Component: "worker", ID: "w1"},
		Action: "load", Human: "loading", JobID: fuzzJob, Fields: map[string]any{"n": 1.0}})
	state := mustJSON(f, api.StateChange{Time: time.Unix(1700000000, 0).UTC(), From: api.JobRunning, State: api.JobCompleted,
		Actor: api.Actor{Component: "worker"}, Attempt: 1, Result: json.RawMessage(`{"stop_reason":"eos"}`)})
	for _, seed := range []struct {
		subject string
		data    []byte
	}{
		{eventSubject(subjects.EventNarration), narration},
		{eventSubject(subjects.EventState), state},
		{eventSubject(subjects.EventToken), mustJSON(f, api.Token{Index: 0, ID: 1, Text: "Hello"})},
		{eventSubject(subjects.EventToken), mustJSON(f, fuzzChunk(5, 2, " a", "\"b\"", "é", "\n", "日本"))},
		{eventSubject(subjects.EventToken), []byte(`{"i":3,"t":"x","more":["y","z"],"more_ids":[9]}`)},
		{eventSubject(subjects.EventToken), []byte(`{"i":3,"t":"x","more":["y"],"more_ids":[9,10,11,12]}`)},
		{eventSubject(subjects.EventToken), []byte(`{"i":9223372036854775807,"t":"x","more":["y"]}`)},
		{eventSubject(subjects.EventToken), []byte(`{"i":-1,"t":"x"}`)},
		{eventSubject(subjects.EventToken), []byte(`{"i":0,"t":"","more":[` + strings.Repeat(`"",`, 2*maxChunkTokens) + `""]}`)},
		{eventSubject(subjects.EventToken), []byte(`{"i":0,"t":"","more_ids":[` + strings.Repeat(`0,`, 2*maxChunkTokens) + `0]}`)},
		{eventSubject(subjects.EventToken), []byte(`null`)},
		{eventSubject(subjects.EventState), []byte(`{"state":1}`)},
		{eventSubject(subjects.EventNarration), []byte(`{"fields":[]}`)},
		{eventSubject("cancel"), []byte(`{}`)},
		{"rbee.job." + fuzzJob, nil},
		{"rbee.job.a.b.token", nil},
		{"other.job." + fuzzJob + ".token", []byte(`{"i":0}`)},
		{"rbee.job..token", []byte(`{"i":0}`)},
		{"", nil},
	} {
		f.Add(seed.subject, seed.data, uint64(7))
	}
	space := subjects.Default()
	f.Fuzz(func(t *testing.T, subject string, data []byte, seq uint64) {
		ev, err := DecodeEvent(space, eventMsg(subject, seq, data))
		if ev.Seq != seq {
			t.Fatalf("Seq = %d, want the message's %d", ev.Seq, seq)
		}
		if err != nil {
			return
		}
		_, kind, ok := space.JobIDFromSubject(subject)
		if !ok || ev.Kind != string(kind) {
			t.Fatalf("decoded %q from subject %q", ev.Kind, subject)
		}
		set := 0
		for _, p := range []bool{ev.Narration != nil, ev.Token != nil, ev.State != nil} {
			if p {
				set++
			}
		}
		if set != 1 {
			t.Fatalf("an event of kind %q with %d payloads", ev.Kind, set)
		}
		checkSplit(t, ev, splitChunk(ev, nil))
	})
}

// TestDecodeEventRefusesTokensNoPublisherSends pins the bounds the fuzz
// targets check: the largest chunk a publisher makes decodes, and no token
// message can make a follower split it into more events than that.
func TestDecodeEventRefusesTokensNoPublisherSends(t *testing.T) {
	texts := func(n int) []string { return strings.Split(strings.Repeat("x", n), "") }
	largest := fuzzChunk(0, 1, texts(maxChunkTokens)...)
	for _, tc := range []struct {
		name string
		data []byte
		ok   bool
	}{
		{"the largest chunk", mustJSON(t, largest), true},
		{"one token more", mustJSON(t, fuzzChunk(0, 1, texts(maxChunkTokens+1)...)), false},
		{"65536 empty texts", []byte(`{"i":0,"t":"","more":[` + strings.Repeat(`"",`, 1<<16) + `""]}`), false},
		{"more ids than texts", []byte(`{"i":0,"t":"a","more":["b"],"more_ids":[1,2]}`), false},
		{"ids without texts", []byte(`{"i":0,"t":"a","more_ids":[1]}`), false},
		{"fewer ids than texts", []byte(`{"i":0,"t":"a","more":["b","c"],"more_ids":[1]}`), true},
		{"a negative index", []byte(`{"i":-1,"t":"a"}`), false},
		{"the last index", []byte(`{"i":9223372036854775806,"t":"a"}`), true},
		{"an index that overflows", []byte(`{"i":9223372036854775807,"t":"a"}`), false},
		{"a chunk that overflows", []byte(`{"i":9223372036854775805,"t":"a","more":["b","c"]}`), false},
	} {
		ev, err := DecodeEvent(subjects.Default(), eventMsg(eventSubject(subjects.EventToken), 1, tc.data))
		if (err == nil) != tc.ok {
			t.Fatalf("%s: DecodeEvent error = %v, want ok = %v", tc.name, err, tc.ok)
		}
		if err == nil {
			checkSplit(t, ev, splitChunk(ev, nil))
		}
	}
}

// followLines turns the fuzz input into stored messages, one a line: the
// first byte names the subject's kind ('n'arration, 't'oken, 's'tate,
// anything else a subject no job event has), the rest is the message.
func followLines(data []byte) []jetstream.Msg {
	var msgs []jetstream.Msg
	for i, line := range bytes.Split(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		kind := map[byte]subjects.EventKind{'n': subjects.EventNarration, 't': subjects.EventToken, 's': subjects.EventState}[line[0]]
		if kind == "" {
			kind = "x"
		}
		msgs = append(msgs, eventMsg(eventSubject(kind), uint64(i+1), line[1:]))
	}
	return msgs
}

// follow runs the loop of Follow over stored messages: decode (skipping
// what does not decode), split chunks, put tokens in order, stop after the
// terminal event. It checks, for every step, that a follower holds no more
// than maxHeldTokens, and that what it hands out is each token once, in
// index order, of the attempt the job is at.
func follow(t *testing.T, msgs []jetstream.Msg, resumed bool) (delivered int) {
	t.Helper()
	order := tokenOrder{resumed: resumed}
	var split []api.Event
	attempt, last, haveLast := order.attempt, 0, false
	for _, msg := range msgs {
		ev, err := DecodeEvent(subjects.Default(), msg)
		if err != nil {
			continue
		}
		split = splitChunk(ev, split[:0])
		checkSplit(t, ev, split)
		for _, one := range split {
			out := order.admit(one)
			if len(order.held) > maxHeldTokens {
				t.Fatalf("a follower holds %d tokens (at most %d)", len(order.held), maxHeldTokens)
			}
			if order.attempt != attempt {
				// A new attempt may count from 0 again.
				attempt, haveLast = order.attempt, false
			}
			for _, ev := range out {
				delivered++
				if ev.Token == nil {
					if ev.Terminal() {
						return delivered
					}
					continue
				}
				tk := ev.Token
				if a := tk.Attempt; a != 0 && a != order.attempt {
					t.Fatalf("token %d of attempt %d handed out while the job is at attempt %d", tk.Index, a, order.attempt)
				}
				if haveLast && tk.Index <= last {
					t.Fatalf("token %d handed out after token %d", tk.Index, last)
				}
				last, haveLast = tk.Index, true
			}
		}
	}
	return delivered
}

// FuzzFollowOrder: a job's stored events in any order, with copies, gaps,
// stale attempts and broken messages, through Follow's decode, split and
// order.
func FuzzFollowOrder(f *testing.F) {
	line := func(kind byte, v any) string { return string(kind) + string(mustJSON(f, v)) }
	running := func(a int) api.StateChange {
		return api.StateChange{From: api.JobQueued, State: api.JobRunning, Attempt: a}
	}
	retry := api.StateChange{From: api.JobRunning, State: api.JobQueued, Attempt: 1}
	done := api.StateChange{From: api.JobRunning, State: api.JobCompleted, Attempt: 2}
	lines := func(ls ...string) []byte { return []byte(strings.Join(ls, "\n")) }
	f.Add(lines(
		line('n', api.Narration{Action: "queued", Human: "queued"}),
		line('s', running(1)),
		line('t', fuzzChunk(0, 1, "a", "b", "c")),
		line('t', fuzzChunk(2, 1, "c", "d")), // a resent chunk overlaps
		line('t', fuzzChunk(6, 1, "g")),      // a gap, filled at the end
		line('t', fuzzChunk(4, 1, "e", "f")),
		line('s', done),
	), false)
	f.Add(lines(
		line('s', running(1)),
		line('t', fuzzChunk(0, 1, "stale")),
		line('s', retry),
		line('t', fuzzChunk(1, 1, "late token of attempt 1")),
		line('s', running(2)),
		line('t', fuzzChunk(0, 2, "fresh", "start")),
		line('t', fuzzChunk(5, 0, "unknown attempt")),
		line('s', done),
	), false)
	f.Add(lines(
		line('t', fuzzChunk(40, 0, "resumed", "mid-job")),
		line('t', fuzzChunk(39, 0, "before")),
		`t{"i":9223372036854775807,"t":"x"}`,
		`t{"i":9223372036854775806,"t":"x","more":["y","z"]}`,
		`t{"i":-3,"t":"negative"}`,
		`t{"i":50,"t":"x","more":["a"],"more_ids":[1,2,3,4,5]}`,
		`t{broken`,
		`x{"i":1}`,
		line('s', api.StateChange{State: api.JobFailed, Attempt: math.MaxInt}),
	), true)
	f.Add(lines(
		line('s', api.StateChange{From: api.JobRunning, State: api.JobQueued, Attempt: math.MaxInt}),
		line('t', fuzzChunk(0, 1, "a")),
		line('t', fuzzChunk(0, math.MinInt, "b")),
		line('s', api.StateChange{State: api.JobRunning, Attempt: -1}),
	), false)
	f.Add([]byte(""), false)
	f.Add([]byte("t\nt{}\ns{}\nn{}\ns{\"state\":\"completed\"}"), true)
	f.Fuzz(func(t *testing.T, data []byte, resumed bool) {
		msgs := followLines(data)
		follow(t, msgs, resumed)
	})
}

// FuzzFollowGivesUpAGap drives the held-token limit: tokens far ahead of
// the next index, from a compact input, so the fuzzer reaches maxHeldTokens
// without megabytes of JSON. Past the limit each token costs a scan of what
// is held, so a run stops a little after it.
func FuzzFollowGivesUpAGap(f *testing.F) {
	f.Add(uint16(maxHeldTokens+3), uint16(2), int64(10), false)
	f.Add(uint16(1), uint16(1), int64(math.MaxInt64-5), true)
	f.Add(uint16(maxHeldTokens+40), uint16(7), int64(-100), false)
	f.Fuzz(func(t *testing.T, n, stride uint16, first int64, resumed bool) {
		var msgs []jetstream.Msg
		for k := range int(n) % (maxHeldTokens + 64) {
			i := int(first) + k*int(stride)
			data := fmt.Appendf(nil, `{"i":%d,"t":"x"}`, i)
			msgs = append(msgs, eventMsg(eventSubject(subjects.EventToken), uint64(k+1), data))
		}
		follow(t, msgs, resumed)
	})
}

// fakeRequest is a micro request that records the one reply a handler
// sends.
type fakeRequest struct {
	data    []byte
	replies chan fakeReply
}

type fakeReply struct {
	data   []byte
	header nats.Header
	// viaError says the handler used Error, which races with micro's
	// dispatcher (see respondErr).
	viaError bool
}

func (r *fakeRequest) Respond(data []byte, opts ...micro.RespondOpt) error {
	m := nats.NewMsg("reply")
	for _, o := range opts {
		o(m)
	}
	r.replies <- fakeReply{data: data, header: m.Header}
	return nil
}

func (r *fakeRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	data, err := json.Marshal(v)
	if err != nil {
		return micro.ErrMarshalResponse
	}
	return r.Respond(data, opts...)
}

func (r *fakeRequest) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	r.replies <- fakeReply{data: data, viaError: true}
	return nil
}

func (r *fakeRequest) Data() []byte           { return r.data }
func (r *fakeRequest) Headers() micro.Headers { return nil }
func (r *fakeRequest) Subject() string        { return "rbee.queen.submit" }
func (r *fakeRequest) Reply() string          { return "_INBOX.fuzz" }

// handle runs one request through a Handler for Req whose function
// validates it with check, and returns the reply.
func handle[Req any](t *testing.T, e *Endpoints, data []byte, check func(Req) error) fakeReply {
	t.Helper()
	h := Handler(e, "fuzz", func(_ context.Context, req Req) (Req, error) { return req, check(req) })
	r := &fakeRequest{data: data, replies: make(chan fakeReply, 2)}
	h.Handle(r)
	select {
	case rep := <-r.replies:
		if rep.viaError {
			t.Fatal("the handler answered with Request.Error")
		}
		select {
		case extra := <-r.replies:
			t.Fatalf("a second reply: %+v", extra)
		case <-time.After(time.Millisecond):
		}
		return rep
	case <-time.After(10 * time.Second):
		t.Fatal("no reply")
	}
	return fakeReply{}
}

// checkReply checks a Handler's reply to data: the decoded request echoed
// when it decodes (and check passes), a 400 when it does not, never a 500
// (a panic).
func checkReply[Req any](t *testing.T, e *Endpoints, data []byte, check func(Req) error) {
	t.Helper()
	rep := handle(t, e, data, check)
	var req Req
	decodes := len(data) == 0 || json.Unmarshal(data, &req) == nil
	code := rep.header.Get(micro.ErrorCodeHeader)
	switch {
	case code == "500":
		t.Fatalf("%T: %q answered 500: %s", req, data, rep.header.Get(micro.ErrorHeader))
	case !decodes:
		if code != "400" || rep.header.Get(ReasonHeader) != string(api.ReasonInvalidRequest) || !strings.HasPrefix(rep.header.Get(micro.ErrorHeader), "malformed fuzz request") {
			t.Fatalf("%T: malformed %q answered %q %q: %q", req, data, code, rep.header.Get(ReasonHeader), rep.header.Get(micro.ErrorHeader))
		}
	case check(req) != nil:
		if code == "" || rep.header.Get(ReasonHeader) == "" {
			t.Fatalf("%T: refused %q answered without an error: %v", req, data, rep.header)
		}
	default:
		if code != "" {
			t.Fatalf("%T: %q answered an error: %v", req, data, rep.header)
		}
		if want := mustJSON(t, req); !bytes.Equal(rep.data, want) {
			t.Fatalf("%T: %q answered %q, want %q", req, data, rep.data, want)
		}
	}
}

// FuzzHandler: the request decoding of bus.Handler, which every endpoint of
// the queen, the hives and the workers goes through, for the request types
// they accept, each with the first check its handler makes.
func FuzzHandler(f *testing.F) {
	seed := uint32(7)
	for _, v := range []any{
		api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: mustJSON(f, api.InferArgs{Model: "tiny", Prompt: "hi"})}, Timeout: api.Duration(time.Minute)},
		api.InferArgs{Model: "tiny", Prompt: "hi", Sampling: api.Sampling{MaxTokens: 8, Temperature: 0.5, Seed: &seed, Stop: []string{"."}}},
		api.InferArgs{Model: "tiny", Prompt: "hi", Sampling: api.Sampling{TopK: -1}},
		api.WorkerSpawnArgs{Hive: "h1", Model: "tiny", Slots: 2, LoadTimeout: api.Duration(time.Minute)},
		api.WorkerStopArgs{Worker: "w1", Grace: api.Duration(-time.Second)},
		api.JobListRequest{State: api.JobFailed, Limit: 10, Before: fuzzJob},
		api.JobRequest{ID: "a.b"},
		api.ModelRequest{Model: "tiny"},
	} {
		f.Add(mustJSON(f, v))
	}
	for _, s := range []string{"", "null", "{}", "[]", "{", "\xff", `{"op":{"kind":"infer","args":{"sampling":{"temperature":1e39}}}}`,
		`{"grace":"forever"}`, `{"limit":1.5}`, strings.Repeat("[", 20000)} {
		f.Add([]byte(s))
	}
	e := NewEndpoints(4, 5*time.Second)
	idCheck := func(kind subjects.Kind, id string) error {
		if id == "" {
			return nil
		}
		if err := subjects.ValidateID(kind, id); err != nil {
			return api.InvalidParam("id", "%v", err)
		}
		return nil
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkReply(t, e, data, func(r api.SubmitRequest) error {
			if r.Op.Kind == "" {
				return api.Fail(api.ReasonInvalidRequest, "op.kind", "no operation")
			}
			return nil
		})
		checkReply(t, e, data, func(a api.InferArgs) error {
			if err := a.Sampling.Validate(0); err != nil {
				return err
			}
			if err := a.ValidatePrompt(); err != nil {
				return err
			}
			return nil
		})
		checkReply(t, e, data, func(a api.WorkerSpawnArgs) error { return idCheck(subjects.KindHive, a.Hive) })
		checkReply(t, e, data, func(a api.WorkerStopArgs) error {
			if a.Grace < 0 {
				return api.Errorf(api.CodeBadRequest, "grace must not be negative, got %s", time.Duration(a.Grace))
			}
			return nil
		})
		checkReply(t, e, data, func(r api.JobListRequest) error { return idCheck(subjects.KindJob, r.Before) })
		checkReply(t, e, data, func(r api.JobRequest) error { return idCheck(subjects.KindJob, r.ID) })
		checkReply(t, e, data, func(struct{}) error { return nil })
	})
}

// headerValue is a string as it arrives in a NATS header: nats.go trims it
// and turns line breaks into spaces, so an error message cannot forge a
// header of its own.
func headerValue(s string) string {
	return textproto.TrimString(strings.NewReplacer("\r", " ", "\n", " ").Replace(textproto.TrimString(s)))
}

// FuzzCallError: an endpoint's error crosses the bus in headers (respondErr)
// and Call rebuilds it as an *api.Error with its code, reason and parameter.
// This one runs a real in-process server: the headers are parsed the way
// every caller parses them.
func FuzzCallError(f *testing.F) {
	f.Add(400, "invalid_param", "max_tokens", "invalid max_tokens: must be at least 1, got -1", 0)
	f.Add(404, "", "", "model x is not in hive h's catalog", 0)
	f.Add(507, "", "", "a hive's own code", 0)
	f.Add(0, "made_up", "p", "no code", 0)
	f.Add(0, "", "", "plain error", 1)
	f.Add(409, "conflict", "", "wrapped", 2)
	f.Add(-1, " spaced ", "\tparam\t", "line one\r\nRbee-Error-Reason: not_found\r\n\r\nbody", 0)
	f.Add(500, "internal", "", "", 0)
	f.Add(400, "", "", "   ", 0)
	f.Add(400, "", "", "nul \x00 and escape \x1b[31m", 0)
	f.Add(math.MaxInt, strings.Repeat("r", 300), strings.Repeat("p", 300), strings.Repeat("m", 4000), 0)

	srv, err := StartServer(ServerConfig{DataDir: f.TempDir(), Listen: "-", Log: zerolog.Nop()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(srv.Shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := Connect(ctx, ConnectConfig{Name: "fuzz", Extra: srv.InProcessOptions(), Log: zerolog.Nop()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(b.Close)
	var (
		mu      sync.Mutex
		answer  error
		subject = "fuzz.call"
	)
	e := NewEndpoints(1, 5*time.Second)
	svc, err := micro.AddService(b.NC, micro.Config{Name: "fuzz", Version: "0.0.1"})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = svc.Stop() })
	if err := svc.AddEndpoint("call", Handler(e, "call", func(context.Context, struct{}) (struct{}, error) {
		mu.Lock()
		defer mu.Unlock()
		return struct{}{}, answer
	}), micro.WithEndpointSubject(subject)); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, code int, reason, param, message string, shape int) {
		var sent error = &api.Error{Code: code, Reason: api.Reason(reason), Param: param, Message: message}
		switch shape % 3 {
		case 1:
			sent = errors.New(message)
		case 2:
			sent = fmt.Errorf("%s: %w", message, &api.Error{Code: code, Reason: api.Reason(reason), Param: param, Message: "inner"})
		}
		mu.Lock()
		answer = sent
		mu.Unlock()
		want := api.AsError(sent)
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		got := b.Call(cctx, subject, nil, nil)
		if got == nil {
			t.Fatalf("the error %+v crossed the bus as success", want)
		}
		var ae *api.Error
		if !errors.As(got, &ae) {
			t.Fatalf("Call returned %T %v, want an *api.Error", got, got)
		}
		// A reason the headers trim away is the code's.
		wantReason := api.ReasonOf(&api.Error{Code: want.Code, Reason: api.Reason(headerValue(string(want.Reason)))})
		wantMessage := headerValue(want.Message)
		if wantMessage == "" {
			// A blank message is given words by the responder.
			wantMessage = ae.Message
			if !strings.Contains(ae.Message, "no message") {
				t.Fatalf("a blank message came back as %q", ae.Message)
			}
		}
		if ae.Code != want.Code || ae.Reason != wantReason || ae.Param != headerValue(want.Param) || ae.Message != wantMessage {
			t.Fatalf("sent %+v, Call rebuilt %+v", want, ae)
		}
	})
}
