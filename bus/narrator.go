package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// Narrator publishes narration for one component: human sentences about
// what it is doing for a job, for the person who asked. Each one is also
// logged at debug level, so an operator reading the component's log sees
// the same steps.
type Narrator struct {
	bus    *Bus
	actor  api.Actor
	hive   string
	worker string
}

// Narrator returns a narrator speaking as actor. Hive and worker ids, when
// the actor is one, are stamped on every event.
func (b *Bus) Narrator(actor api.Actor, hive, worker string) *Narrator {
	return &Narrator{bus: b, actor: actor, hive: hive, worker: worker}
}

// Narrate publishes ev, filling in time, level, actor and ids. Events with a
// job go to that job's narration subject (stored, followable); others go to
// the cluster narration subject (live only). Narration is best effort for
// the job's sake: a failure is returned for the caller to log, and the job
// goes on.
func (n *Narrator) Narrate(ctx context.Context, ev api.Narration) error {
	ev = n.fill(ev)
	if ev.JobID == "" {
		data, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		return n.bus.NC.Publish(n.bus.Space.ClusterNarration(), data)
	}
	err := n.bus.PublishEvent(ctx, ev.JobID, subjects.EventNarration, ev)
	if err != nil {
		n.bus.Log.Warn().Err(err).Str("job", ev.JobID).Msg("narration not published")
	}
	return err
}

// Post narrates on a job without waiting for the stream to store the
// event: for a line on the path to a job's first token, where a round trip
// is time the user waits. The server stores a connection's messages in the
// order sent, so the line still precedes whatever the caller publishes next.
func (n *Narrator) Post(job, action, target string, fields map[string]any, format string, args ...any) {
	ev := n.fill(api.Narration{JobID: job, Action: action, Target: target, Fields: fields, Human: fmt.Sprintf(format, args...)})
	if err := n.bus.PostEvent(job, subjects.EventNarration, ev); err != nil {
		n.bus.Log.Warn().Err(err).Str("job", job).Msg("narration not published")
	}
}

// fill stamps time, level, actor and ids, and logs the line at debug level.
func (n *Narrator) fill(ev api.Narration) api.Narration {
	if ev.Time.IsZero() {
		ev.Time = time.Now().UTC()
	}
	if ev.Level == "" {
		ev.Level = "info"
	}
	ev.Actor = n.actor
	if ev.HiveID == "" {
		ev.HiveID = n.hive
	}
	if ev.WorkerID == "" {
		ev.WorkerID = n.worker
	}
	n.bus.Log.Debug().Str("job", ev.JobID).Str("action", ev.Action).Str("target", ev.Target).
		Interface("fields", ev.Fields).Msg(ev.Human)
	return ev
}

// Say narrates at info level: action on target, as a sentence.
func (n *Narrator) Say(ctx context.Context, job, action, target, format string, args ...any) {
	_ = n.Narrate(ctx, api.Narration{JobID: job, Action: action, Target: target, Human: fmt.Sprintf(format, args...)})
}

// Warn narrates at warn level.
func (n *Narrator) Warn(ctx context.Context, job, action, target, format string, args ...any) {
	_ = n.Narrate(ctx, api.Narration{Level: "warn", JobID: job, Action: action, Target: target, Human: fmt.Sprintf(format, args...)})
}

// With narrates with key/value fields (progress figures and the like).
func (n *Narrator) With(ctx context.Context, job, action, target string, fields map[string]any, format string, args ...any) {
	_ = n.Narrate(ctx, api.Narration{JobID: job, Action: action, Target: target, Fields: fields, Human: fmt.Sprintf(format, args...)})
}
