package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/subjects"
)

// LeaderReads makes kv's Get read from its stream's leader, so that a read
// sees every write acknowledged before it: what a compare-and-swap after a
// read, and a program reading back its own write, rely on. Everything
// else is kv's own.
//
// nats.go's Get is a direct get, which any server holding a copy of the
// stream may answer (the client's server picks one at random, its own
// copy among them), and a follower answers from what it has applied,
// which lags the leader's acknowledgement of a write. A queen that
// created a job and read it back at once found no such job 51 times in
// 500 on a loaded 2-core machine, and an operation then never started. A
// leader is what acknowledges writes, so its answer holds them all. A
// stream without a leader answers no read: the read waits out an
// election, as a write does (WhileElecting), then fails with ErrNoQuorum.
func LeaderReads(nc *nats.Conn, kv jetstream.KeyValue) jetstream.KeyValue {
	if _, ok := kv.(leaderKV); ok {
		return kv
	}
	return leaderKV{KeyValue: kv, nc: nc, api: "$JS.API.STREAM.MSG.GET." + subjects.KVStream(kv.Bucket())}
}

type leaderKV struct {
	jetstream.KeyValue
	nc  *nats.Conn
	api string // the stream's message-get endpoint, served by its leader
}

func (kv leaderKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	var e jetstream.KeyValueEntry
	err := WhileElecting(ctx, true, func(ctx context.Context, _ bool) (err error) {
		e, err = kv.last(ctx, key)
		return err
	})
	return e, err
}

// msgGetResponse is nats-server's answer to a message get (JSApiMsgGetResponse).
type msgGetResponse struct {
	Error   *jetstream.APIError `json:"error,omitempty"`
	Message *struct {
		Subject  string    `json:"subject"`
		Sequence uint64    `json:"seq"`
		Header   []byte    `json:"hdrs,omitempty"`
		Data     []byte    `json:"data,omitempty"`
		Time     time.Time `json:"time"`
	} `json:"message,omitempty"`
}

// kvOperation is the header that marks a delete or purge in a bucket
// (nats.go's name, unexported there).
const kvOperation = "KV-Operation"

func (kv leaderKV) last(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	req, err := json.Marshal(map[string]string{"last_by_subj": subjects.KVSubject(kv.Bucket(), key)})
	if err != nil {
		return nil, err
	}
	msg, err := kv.nc.RequestWithContext(ctx, kv.api, req)
	if err != nil {
		return nil, err
	}
	var resp msgGetResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("read %s from bucket %s: %w", key, kv.Bucket(), err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return nil, jetstream.ErrKeyNotFound
	case resp.Error != nil:
		return nil, resp.Error
	case resp.Message == nil:
		return nil, jetstream.ErrInvalidJetStreamResponse
	}
	m := resp.Message
	if len(m.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(m.Header)
		if err != nil {
			return nil, fmt.Errorf("read %s from bucket %s: %w", key, kv.Bucket(), err)
		}
		// As nats.go's Get reads them: a delete, a purge, and the marker
		// a message's expiry leaves, are a key not found.
		if h.Get(kvOperation) != "" || h.Get(jetstream.MarkerReasonHeader) != "" {
			return nil, jetstream.ErrKeyNotFound
		}
	}
	return entry{bucket: kv.Bucket(), key: key, value: m.Data, revision: m.Sequence, created: m.Time}, nil
}

// entry is one value read from a bucket.
type entry struct {
	bucket, key string
	value       []byte
	revision    uint64
	created     time.Time
}

func (e entry) Bucket() string                  { return e.bucket }
func (e entry) Key() string                     { return e.key }
func (e entry) Value() []byte                   { return e.value }
func (e entry) Revision() uint64                { return e.revision }
func (e entry) Created() time.Time              { return e.created }
func (e entry) Delta() uint64                   { return 0 }
func (e entry) Operation() jetstream.KeyValueOp { return jetstream.KeyValuePut }
