package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// PublishEvent stores one event of a job on its subject and waits for the
// stream's acknowledgement, so an event that returned without error is
// durable and will be seen by every follower.
func (b *Bus) PublishEvent(ctx context.Context, job string, kind subjects.EventKind, v any, opts ...jetstream.PublishOpt) error {
	subject, err := b.Space.JobEvent(job, kind)
	if err != nil {
		return err
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", kind, err)
	}
	if _, err := b.JS.Publish(ctx, subject, data, opts...); err != nil {
		return fmt.Errorf("publish %s event of job %s: %w", kind, job, err)
	}
	return nil
}

// PostEvent stores one event of a job without waiting for the stream's
// acknowledgement: for an event on the way to a job's first token, where a
// round trip is time the user waits. The server stores one connection's
// messages in the order sent, so the event still precedes whatever this
// connection publishes next; a failure is not reported.
func (b *Bus) PostEvent(job string, kind subjects.EventKind, v any) error {
	subject, err := b.Space.JobEvent(job, kind)
	if err != nil {
		return err
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", kind, err)
	}
	return b.NC.Publish(subject, data)
}

// TokenPublisher streams a job's tokens in as few messages as the bus
// needs. A token is sent at once when no message of the job is in flight;
// tokens that come while one is wait, and go out together as one chunk
// (see api.Token) as soon as it is acknowledged. There is no timer: a model
// slower than a round trip still sends every token alone, the moment it
// comes, and a fast one sends fewer, larger messages, so the bus costs per
// round trip, not per token. Flush waits until every token is stored, so
// the job's final state, published after it, reaches no follower before
// the last token.
//
// A message whose acknowledgement is lost to a reconnect (the server or the
// queen that embeds it restarted) is sent again. If the first copy was
// stored after all, the stream holds its tokens twice, and a resent message
// may land after later ones: Follow orders tokens by index and drops
// copies, so every follower still sees each token once, in order. (A
// message id would let the stream drop the copy itself, but its dedupe
// index costs the server a third of its throughput.)
//
// Publish and Flush are called from one goroutine (the generation's);
// Hold, Release and Close from any. While a message is in flight a
// goroutine of the publisher waits for its acknowledgement; it ends when
// nothing is left to send, and at the latest when Flush or Close returns.
type TokenPublisher struct {
	bus     *Bus
	subject string
	// ResendWithin bounds how long a lost message is retried while the
	// connection recovers.
	ResendWithin time.Duration

	// stop ends the waits of a drain that Close (or a Flush whose context
	// ended) gives up on.
	stop   context.Context
	cancel context.CancelFunc

	mu sync.Mutex
	// room is signalled when pending is taken or the drain ends, for a
	// Publish waiting on a full buffer.
	room *sync.Cond
	// sending is true while a drain goroutine owns the stream: Publish
	// then only buffers; done is closed when that drain ends.
	sending bool
	done    chan struct{}
	// held is true from Hold to Release: Publish only buffers, and
	// nothing is sent.
	held bool
	// pending waits for the message in flight; spare is the drain's
	// previous buffer, reused.
	pending, spare []api.Token
	// err is why a token could not be stored; every later call returns it.
	err error
}

// Limits of one chunk and of what may wait for the bus. A chunk stays far
// below any max_payload; the wait is bounded so a stalled bus holds back the
// generation instead of its memory, and so a resent chunk lands fewer
// tokens behind its place than a follower holds for a gap (maxHeldTokens).
const (
	maxChunkTokens   = api.MaxChunkTokens
	maxChunkBytes    = 32 << 10
	maxPendingTokens = 4096
)

// Tokens returns a publisher for job's token subject.
func (b *Bus) Tokens(job string) (*TokenPublisher, error) {
	subject, err := b.Space.JobEvent(job, subjects.EventToken)
	if err != nil {
		return nil, err
	}
	p := &TokenPublisher{bus: b, subject: subject, ResendWithin: 25 * time.Second}
	p.stop, p.cancel = context.WithCancel(context.Background())
	p.room = sync.NewCond(&p.mu)
	return p, nil
}

// Publish sends one token, or buffers it while a message is in flight; it
// blocks only while maxPendingTokens wait. An error means a token (this or
// an earlier one) could not be stored: the stream is broken.
func (p *TokenPublisher) Publish(t api.Token) error {
	p.mu.Lock()
	for (p.sending || p.held) && p.err == nil && len(p.pending) >= maxPendingTokens {
		p.room.Wait()
	}
	if p.err != nil {
		err := p.err
		p.mu.Unlock()
		return err
	}
	if p.sending || p.held {
		p.pending = append(p.pending, t)
		p.mu.Unlock()
		return nil
	}
	// Nothing in flight: this token goes out now, from this goroutine,
	// and a drain waits for its acknowledgement.
	p.sending = true
	p.done = make(chan struct{})
	p.mu.Unlock()
	go p.drain([]flight{p.send([]api.Token{t})})
	return nil
}

// Hold makes Publish keep every token back until Release, for a
// generation that begins before its job is known to be its own (a worker
// feeds the prompt while it takes the job). The generation never waits
// for that answer: what it makes meanwhile waits here, and Release sends
// it from the goroutine that has the answer, or Close drops it unsent.
// Hold is called before the first Publish.
func (p *TokenPublisher) Hold() {
	p.mu.Lock()
	p.held = true
	p.mu.Unlock()
}

// Release ends a Hold: the tokens kept back go out at once, as one chunk
// (or as few as the chunk limits allow), and later ones as usual.
func (p *TokenPublisher) Release() {
	p.mu.Lock()
	if !p.held {
		p.mu.Unlock()
		return
	}
	p.held = false
	p.room.Broadcast()
	if len(p.pending) == 0 || p.err != nil {
		p.mu.Unlock()
		return
	}
	batch := p.pending
	p.pending = nil
	p.sending = true
	p.done = make(chan struct{})
	p.mu.Unlock()
	go p.drain(p.sendAll(nil, batch))
}

// errPublisherHeld is a Flush of tokens that were never released.
var errPublisherHeld = errors.New("token publisher held: its tokens were never released")

// Flush waits until every token published so far is stored. If ctx ends
// first the publisher gives up (as Close) and returns ctx's error.
func (p *TokenPublisher) Flush(ctx context.Context) error {
	p.mu.Lock()
	sending, done, held := p.sending, p.done, p.held
	p.mu.Unlock()
	if held {
		return errPublisherHeld
	}
	if sending {
		select {
		case <-done:
		case <-ctx.Done():
			p.Close()
			return ctx.Err()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Close stops the publisher without waiting for the bus: tokens not yet
// acknowledged may be lost, and later calls fail. It returns once the
// publisher's goroutine has ended.
func (p *TokenPublisher) Close() {
	p.cancel()
	p.mu.Lock()
	sending, done := p.sending, p.done
	if p.err == nil {
		p.err = errPublisherClosed
	}
	p.room.Broadcast()
	p.mu.Unlock()
	if sending {
		<-done
	}
}

var errPublisherClosed = errors.New("token publisher closed")

// flight is one message sent: its future, or why it could not even be sent.
type flight struct {
	f   jetstream.PubAckFuture
	msg *nats.Msg
	err error
}

// send encodes toks as one message and publishes it without waiting.
func (p *TokenPublisher) send(toks []api.Token) flight {
	data, err := json.Marshal(chunk(toks))
	if err != nil {
		return flight{err: fmt.Errorf("encode token %d: %w", toks[0].Index, err)}
	}
	msg := &nats.Msg{Subject: p.subject, Data: data}
	f, err := p.bus.JS.PublishMsgAsync(msg)
	if err != nil {
		return flight{msg: msg, err: err}
	}
	return flight{f: f, msg: msg}
}

// sendAll sends toks in as few chunks as the limits allow, without
// waiting, and appends their flights to dst.
func (p *TokenPublisher) sendAll(dst []flight, toks []api.Token) []flight {
	for len(toks) > 0 {
		n := chunkLen(toks)
		dst = append(dst, p.send(toks[:n]))
		toks = toks[n:]
	}
	return dst
}

// chunk makes one api.Token of consecutive tokens of one attempt.
func chunk(toks []api.Token) api.Token {
	c := toks[0]
	c.More, c.MoreIDs = nil, nil
	if len(toks) > 1 {
		c.More = make([]string, len(toks)-1)
		c.MoreIDs = make([]int32, len(toks)-1)
		for k, t := range toks[1:] {
			c.More[k], c.MoreIDs[k] = t.Text, t.ID
		}
	}
	return c
}

// drain owns the stream while messages are in flight: it waits for their
// acknowledgements (resending what a reconnect lost), then sends what
// accumulated meanwhile, until nothing is left.
func (p *TokenPublisher) drain(flights []flight) {
	for {
		var err error
		for _, fl := range flights {
			if err = p.settle(fl); err != nil {
				break
			}
		}
		p.mu.Lock()
		if err != nil && p.err == nil {
			p.err = err
		}
		if len(p.pending) == 0 || p.err != nil {
			// Done, or broken (closed): what waits is never sent.
			p.pending = nil
			p.sending = false
			close(p.done)
			p.room.Broadcast()
			p.mu.Unlock()
			return
		}
		batch := p.pending
		p.pending, p.spare = p.spare[:0], nil
		p.room.Broadcast()
		p.mu.Unlock()
		flights = p.sendAll(flights[:0], batch)
		// The tokens are encoded: their buffer serves the next batch.
		clear(batch)
		p.mu.Lock()
		p.spare = batch[:0]
		p.mu.Unlock()
	}
}

// chunkLen is how many of toks go in the next chunk: consecutive indices of
// one attempt, within the chunk limits (at least one token).
func chunkLen(toks []api.Token) int {
	bytes := len(toks[0].Text)
	n := 1
	for n < len(toks) && n < maxChunkTokens {
		t := toks[n]
		bytes += len(t.Text) + 8 // its text, id and separators
		if bytes > maxChunkBytes || t.Index != toks[0].Index+n || t.Attempt != toks[0].Attempt {
			break
		}
		n++
	}
	return n
}

// settle waits until fl is stored, resending it if a reconnect lost it.
func (p *TokenPublisher) settle(fl flight) error {
	if fl.f == nil {
		if fl.msg == nil {
			return fl.err
		}
		return p.resend(p.stop, fl.msg, fl.err)
	}
	select {
	case <-fl.f.Ok():
		return nil
	case err := <-fl.f.Err():
		return p.resend(p.stop, fl.f.Msg(), err)
	case <-p.stop.Done():
		return errPublisherClosed
	}
}

// resend stores a message whose first publish failed with cause, retrying
// while the connection recovers.
func (p *TokenPublisher) resend(ctx context.Context, msg *nats.Msg, cause error) error {
	if msg == nil || !retryable(cause) && !errors.Is(cause, jetstream.ErrTooManyStalledMsgs) {
		return fmt.Errorf("tokens not stored: %w", cause)
	}
	ctx, cancel := context.WithTimeout(ctx, p.ResendWithin)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := p.bus.JS.PublishMsg(actx, msg)
		acancel()
		if err == nil {
			return nil
		}
		if !retryable(err) && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("tokens not stored: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("tokens not stored within %s of a reconnect: %w", p.ResendWithin, cause)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// retryable says whether a publish failed because the connection or the
// server was going away, as opposed to the stream refusing the message.
func retryable(err error) bool {
	return errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrAsyncPublishTimeout)
}

// ErrFollowEnded is returned by a follow handler to stop following early
// without error.
var ErrFollowEnded = errors.New("stop following")

// followHeartbeat is how often a follower's consumer proves it is alive.
const followHeartbeat = time.Second

// attachTimeout bounds each try to attach a follower.
const attachTimeout = 5 * time.Second

// outage reports whether err is what a request gets from a bus that is down
// or still starting, rather than an answer.
func outage(err error) bool {
	// Starting covers timeouts, no responders and "JetStream system
	// temporarily unavailable" (a cluster electing a leader); a queen
	// restarting may also answer without JetStream for a moment.
	return Starting(err) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected)
}

// clientConsumerExpiry is how long a client's follower consumer outlives its
// last read; the follower keeps it busy with pulls while it follows.
const clientConsumerExpiry = 5 * time.Second

// Follow delivers the stored events of job in order, starting at stream
// sequence from (0 means from the job's first event), then live ones as they
// arrive, and returns nil after the job's terminal state event. Tokens come
// one per event (a stored chunk is split), in index order, each once, even
// where a publisher resent one after a reconnect and it was stored behind
// later ones. No idle
// timeout applies: a job that is quiet for an hour is still followed. It
// returns when ctx ends, when fn returns an error (ErrFollowEnded stops
// without one, once the rest of the stored message's tokens are delivered,
// so that resuming at the last event's Seq+1 misses nothing), or after the
// terminal event.
func (b *Bus) Follow(ctx context.Context, job string, from uint64, fn func(api.Event) error) error {
	order := &tokenOrder{resumed: from > 0}
	for {
		next, err := b.follow(ctx, job, from, fn, order)
		if !errors.Is(err, errFollowStalled) {
			return err
		}
		// Its consumer went quiet while the stream holds more of the job
		// (seen on a cluster whose stream leader died: the ordered
		// consumer sometimes never comes back). Attach again after the
		// last event handed over, with the tokens' order kept.
		b.Log.Warn().Str("job", job).Uint64("from", next).Msg("a follow heard nothing while its stream holds more; attaching again")
		from = next
	}
}

// errFollowStalled ends one attachment of a follow whose consumer hands
// nothing over while the stream holds events of the job after the last.
var errFollowStalled = errors.New("follow stalled")

// follow is one attachment of Follow, from stream sequence from, with the
// follow's token order. A stalled attachment returns errFollowStalled and
// the sequence to attach again from.
func (b *Bus) follow(ctx context.Context, job string, from uint64, fn func(api.Event) error, order *tokenOrder) (uint64, error) {
	filter, err := b.Space.JobEvents(job)
	if err != nil {
		return 0, err
	}
	// A follower killed without a goodbye leaves its consumer behind;
	// the server drops it after this long without interest.
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}, InactiveThreshold: 30 * time.Second}
	if b.consumersExpire {
		// It will not be deleted (see ConnectConfig.ConsumersExpire):
		// let it go soon after its follower stops reading.
		cfg.InactiveThreshold = clientConsumerExpiry
	}
	if from > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = from
	}
	// Attaching is requests to JetStream, which a bus that is going away
	// or coming back (a queen restarting) may not answer in time: they are
	// tried again until ctx ends, as the follow itself rides out an outage.
	var cons jetstream.Consumer
	for {
		actx, cancel := context.WithTimeout(ctx, attachTimeout)
		done, err := b.followEnded(actx, job, from, fn)
		if done {
			cancel()
			return 0, err
		}
		if err == nil {
			cons, err = b.JS.OrderedConsumer(actx, b.Space.JobsStream(), cfg)
			if err == nil {
				cancel()
				break
			}
			err = fmt.Errorf("follow job %s: %w", job, err)
		}
		cancel()
		if !outage(err) || ctx.Err() != nil {
			return 0, err
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	// A follower learns that its consumer is gone (the server leading the
	// job stream died, on a cluster) only from missing heartbeats: two
	// of them, 10 s at nats.go's default for ordered consumers, twice a
	// stream's election. One a second costs an idle follower a small
	// message a second and finds a lost consumer within 2 s.
	it, err := cons.Messages(jetstream.PullHeartbeat(followHeartbeat))
	if err != nil {
		return 0, fmt.Errorf("follow job %s: %w", job, err)
	}
	defer it.Stop()
	// Stop leaves the server-side consumer to expire; a follower that ends
	// normally removes it at once, so nothing lingers per finished client.
	defer func() {
		if info := cons.CachedInfo(); info != nil && b.NC.IsConnected() && !b.consumersExpire {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = b.JS.DeleteConsumer(dctx, b.Space.JobsStream(), info.Name)
			cancel()
		}
	}()
	// Next blocks without a context of its own; stopping the iterator
	// when ctx ends unblocks it.
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	// A job's end is two writes, its record and then its state event: a
	// writer that dies between them (a worker killed just as it finished)
	// leaves the record ended and the stream without its end. While the
	// follow is quiet the record is read now and then; once it says the
	// job ended, the stream holds no end event, and this follow has been
	// handed every event the stream holds for the job (a quiet follow may
	// only be one whose consumer is catching up after a reconnect), the
	// follow ends with the record instead of waiting for ever.
	var recordEnd atomic.Pointer[api.Event]
	var stalled atomic.Bool
	var seen atomic.Uint64
	if from > 0 {
		seen.Store(from - 1)
	}
	active := make(chan struct{}, 1)
	stopCheck := make(chan struct{})
	checked := make(chan struct{})
	go func() {
		defer close(checked)
		quiet := time.NewTimer(EndCheckEvery)
		defer quiet.Stop()
		stalls := 0
		for {
			select {
			case <-stopCheck:
				return
			case <-active:
				stalls = 0
				quiet.Reset(EndCheckEvery)
			case <-quiet.C:
				if ev, ok := b.recordEnd(ctx, job, seen.Load()); ok {
					recordEnd.Store(&ev)
					it.Stop()
					return
				}
				// Quiet for two checks in a row while the stream holds
				// more of the job: the consumer is not coming back.
				if behind, err := b.behind(ctx, job, seen.Load()); err == nil && behind {
					if stalls++; stalls >= 2 {
						stalled.Store(true)
						it.Stop()
						return
					}
				} else {
					stalls = 0
				}
				quiet.Reset(EndCheckEvery)
			}
		}
	}()
	defer func() { close(stopCheck); <-checked }()
	var split []api.Event
	for {
		msg, err := it.Next()
		if err != nil {
			if ev := recordEnd.Load(); ev != nil && ctx.Err() == nil {
				for _, ev := range order.admit(*ev) {
					if err := fn(ev); err != nil && !errors.Is(err, ErrFollowEnded) {
						return 0, err
					}
				}
				return 0, nil
			}
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			if stalled.Load() {
				return seen.Load() + 1, errFollowStalled
			}
			return 0, fmt.Errorf("follow job %s: %w", job, err)
		}
		select {
		case active <- struct{}{}:
		default: // already told
		}
		ev, err := DecodeEvent(b.Space, msg)
		seen.Store(max(seen.Load(), ev.Seq))
		if err != nil {
			b.Log.Warn().Err(err).Str("subject", msg.Subject()).Msg("skipping undecodable job event")
			continue
		}
		// Every event a stored message makes due is delivered, even
		// after fn asked to stop: the tokens of a chunk share its Seq,
		// so a follower that resumes after the Seq of the last event it
		// saw misses nothing only if it saw the whole chunk.
		ended := false
		split = splitChunk(ev, split[:0])
		for _, one := range split {
			for _, ev := range order.admit(one) {
				if err := fn(ev); err != nil {
					if !errors.Is(err, ErrFollowEnded) {
						return 0, err
					}
					ended = true
				}
				if ev.Terminal() {
					return 0, nil
				}
			}
		}
		if ended {
			return 0, nil
		}
	}
}

// behind reports whether the job stream holds an event of job stored after
// seen (the last stream sequence a follow was handed).
func (b *Bus) behind(ctx context.Context, job string, seen uint64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	if err != nil {
		return false, err
	}
	for _, kind := range []subjects.EventKind{subjects.EventNarration, subjects.EventToken, subjects.EventState} {
		subject, err := b.Space.JobEvent(job, kind)
		if err != nil {
			return false, err
		}
		last, err := stream.GetLastMsgForSubject(ctx, subject)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			continue
		case err != nil:
			return false, err
		case last.Sequence > seen:
			return true, nil
		}
	}
	return false, nil
}

// EndCheckEvery is how long a follow waits on a quiet stream before it reads
// the job's record to see whether the job ended without its end event.
var EndCheckEvery = 5 * time.Second

// recordEnd reads the job's record: when it says the job ended, the stream
// holds no end event for it, and no event of the job is stored after seen
// (the last stream sequence the follow was handed), it returns the terminal
// event the stream should have held.
func (b *Bus) recordEnd(ctx context.Context, job string, seen uint64) (api.Event, bool) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	kv, err := b.KV(ctx, b.Space.JobsBucket())
	if err != nil {
		return api.Event{}, false
	}
	e, err := kv.Get(ctx, job)
	if err != nil {
		return api.Event{}, false
	}
	var rec api.Job
	if json.Unmarshal(e.Value(), &rec) != nil || !rec.State.Terminal() {
		return api.Event{}, false
	}
	if behind, err := b.behind(ctx, job, seen); err != nil || behind {
		return api.Event{}, false // still to be handed over (the end, maybe)
	}
	at := time.Now().UTC()
	if rec.FinishedAt != nil {
		at = *rec.FinishedAt
	}
	ch := rec.Change("", api.Actor{Component: "record"}, at)
	return api.Event{Kind: string(subjects.EventState), State: &ch}, true
}

// splitChunk appends to out one event per token of ev, each with the Seq
// of the message that carried it; an event without a chunk is appended as
// it is.
func splitChunk(ev api.Event, out []api.Event) []api.Event {
	if ev.Token == nil || len(ev.Token.More) == 0 {
		return append(out, ev)
	}
	toks := make([]api.Token, ev.Token.Len())
	for k := range toks {
		toks[k] = ev.Token.At(k)
		one := ev
		one.Token = &toks[k]
		out = append(out, one)
	}
	return out
}

// tokenOrder puts a job's tokens in index order. A token ahead of the next
// index waits until the gap is filled; one behind it is a copy and is
// dropped. The publisher stores every token before the job's end, so a
// terminal event releases whatever still waits, in order. A gap that is
// never filled (the stream's limits discarded the oldest tokens of a huge
// job) is given up once maxHeldTokens wait behind it.
//
// A job's creation event (queued, from no state) is stored without waiting
// (it is on the way to the first token), so across the servers of a
// cluster it may land after the next state a worker stored: one seen after
// any other state says nothing new and is dropped.
//
// It also fences attempts: once the job's state events say it was retried
// (running → queued) or that a newer attempt runs, tokens of older attempts
// are dropped, and counting starts again at the new attempt's index 0. A
// worker given up while paused or cut off may still publish after it wakes;
// nobody sees those tokens.
const maxHeldTokens = 8192

type tokenOrder struct {
	// resumed means the follow began mid-job: the first token seen sets
	// where counting starts.
	resumed bool
	started bool
	next    int
	held    map[int]api.Event
	// attempt is the oldest attempt whose tokens are still shown.
	attempt int
	// stated is true once a state event was handed over.
	stated bool
	// out is reused for what admit returns: no allocation per token.
	out []api.Event
}

// newAttempt drops what an older attempt left and counts from 0 again.
func (o *tokenOrder) newAttempt(a int) {
	o.attempt = a
	o.started, o.resumed, o.next, o.held = true, false, 0, nil
}

// admit takes the next stored event and returns those now due, in order;
// the slice is valid until the next call.
func (o *tokenOrder) admit(ev api.Event) []api.Event {
	o.out = o.out[:0]
	if st := ev.State; st != nil {
		if st.From == "" && st.State == api.JobQueued && o.stated {
			return o.out // a late creation event
		}
		o.stated = true
		switch {
		case st.State == api.JobQueued && st.From == api.JobRunning && st.Attempt >= o.attempt:
			o.newAttempt(st.Attempt + 1)
		case st.State == api.JobRunning && st.Attempt > o.attempt:
			o.newAttempt(st.Attempt)
		}
	}
	if ev.Token == nil {
		if !ev.Terminal() || len(o.held) == 0 {
			return append(o.out, ev)
		}
		idx := make([]int, 0, len(o.held))
		for i := range o.held {
			idx = append(idx, i)
		}
		slices.Sort(idx)
		for _, i := range idx {
			o.out = append(o.out, o.held[i])
		}
		o.held = nil
		return append(o.out, ev)
	}
	if a := ev.Token.Attempt; a != 0 {
		if a < o.attempt {
			return nil // a stale attempt's token
		}
		if a > o.attempt && o.attempt != 0 {
			o.newAttempt(a)
		}
		o.attempt = a
	}
	i := ev.Token.Index
	if !o.started {
		o.started = true
		if o.resumed {
			o.next = i
		}
	}
	switch {
	case i < o.next:
		return nil
	case i > o.next:
		if o.held == nil {
			o.held = map[int]api.Event{}
		}
		o.held[i] = ev
		if len(o.held) < maxHeldTokens {
			return nil
		}
		o.next = slices.Min(slices.Collect(maps.Keys(o.held)))
		ev = o.held[o.next]
		delete(o.held, o.next)
	}
	o.out = append(o.out, ev)
	for o.next++; ; o.next++ {
		h, ok := o.held[o.next]
		if !ok {
			break
		}
		delete(o.held, o.next)
		o.out = append(o.out, h)
	}
	return o.out
}

// DecodeEvent turns a stored job event message into an api.Event. A token
// chunk stays one event: its Token's Len and At give the tokens it carries
// (Follow hands them out one per event). A token message no publisher makes
// (api.Token.Validate: a negative or overflowing index, more than
// api.MaxChunkTokens tokens, more ids than texts) is an error, so that no
// message can make a follower allocate more than a chunk's worth of events.
func DecodeEvent(space subjects.Space, msg jetstream.Msg) (api.Event, error) {
	var ev api.Event
	if md, err := msg.Metadata(); err == nil {
		ev.Seq = md.Sequence.Stream
	}
	_, kind, ok := space.JobIDFromSubject(msg.Subject())
	if !ok {
		return ev, fmt.Errorf("not a job event subject: %s", msg.Subject())
	}
	ev.Kind = string(kind)
	var err error
	switch kind {
	case subjects.EventNarration:
		ev.Narration = new(api.Narration)
		err = json.Unmarshal(msg.Data(), ev.Narration)
	case subjects.EventToken:
		ev.Token = new(api.Token)
		if err = json.Unmarshal(msg.Data(), ev.Token); err == nil {
			err = ev.Token.Validate()
		}
	case subjects.EventState:
		ev.State = new(api.StateChange)
		err = json.Unmarshal(msg.Data(), ev.State)
	default:
		err = fmt.Errorf("unknown event kind %q", kind)
	}
	return ev, err
}
