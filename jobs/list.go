package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// Walk calls visit with the current records whose id sorts before before
// (every record when before is empty), newest first, optionally only those
// in one state, until visit returns false or the records run out.
//
// It reads the bucket's keys first (no values) and then one record at a
// time, so a walk holds in memory only what visit keeps, however many and
// however large the records are. A record removed while the walk runs is
// skipped.
func (s *Store) Walk(ctx context.Context, state api.JobState, before string, visit func(api.Job) bool) error {
	ids, err := s.idsBefore(ctx, before)
	if err != nil {
		return err
	}
	for _, id := range ids {
		e, err := s.kv.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue
		}
		if err != nil {
			return fmt.Errorf("list jobs: read %s: %w", id, err)
		}
		job, err := decode(e)
		if err != nil {
			continue // a corrupt record is skipped, as List does
		}
		if state != "" && job.State != state {
			continue
		}
		if !visit(job) {
			return nil
		}
	}
	return nil
}

// idsBefore returns the bucket's current keys that sort before before (all
// when empty), newest first, each once.
func (s *Store) idsBefore(ctx context.Context, before string) ([]string, error) {
	l, err := s.kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	defer func() { _ = l.Stop() }()
	seen := map[string]bool{}
	var ids []string
	for {
		select {
		case id, ok := <-l.Keys():
			if !ok {
				sort.Sort(sort.Reverse(sort.StringSlice(ids)))
				return ids, nil
			}
			// ListKeys may report a key twice while it is being written.
			if (before == "" || id < before) && !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// PageMax is the most jobs one list page holds, however small they are.
const PageMax = 500

// Page returns one page of the job list as the queen replies it: records
// whose id sorts before before, newest first, optionally only those in one
// state, at most limit of them (PageMax when limit is 0 or more than that),
// such that the reply encoded as JSON stays within budget bytes. Next is
// set when more records follow.
//
// A record that alone would pass the budget is put in the page with its
// arguments (and, if that is not enough, its result and error) replaced by
// a short note, so a page always makes progress and never passes the budget
// (for any budget above a few KiB), whatever was submitted.
func (s *Store) Page(ctx context.Context, state api.JobState, before string, limit, budget int) (api.JobListReply, error) {
	if limit <= 0 || limit > PageMax {
		limit = PageMax
	}
	// `{"jobs":[]}` plus `,"next":"<id>"` with room for the longest id.
	used := len(`{"jobs":[]}`) + len(`,"next":""`) + subjects.MaxIDLen
	reply := api.JobListReply{Jobs: []api.Job{}}
	var err error
	walkErr := s.Walk(ctx, state, before, func(job api.Job) bool {
		if len(reply.Jobs) == limit {
			reply.Next = reply.Jobs[len(reply.Jobs)-1].ID
			return false
		}
		var size int
		size, err = encodedSize(job)
		if err != nil {
			return false
		}
		if used+size+1 > budget {
			if len(reply.Jobs) > 0 {
				reply.Next = reply.Jobs[len(reply.Jobs)-1].ID
				return false
			}
			job, size = shrink(job, budget-used-1)
		}
		reply.Jobs = append(reply.Jobs, job)
		used += size + 1 // and a comma
		return true
	})
	if walkErr != nil {
		return api.JobListReply{}, walkErr
	}
	if err != nil {
		return api.JobListReply{}, fmt.Errorf("list jobs: %w", err)
	}
	return reply, nil
}

func encodedSize(job api.Job) (int, error) {
	b, err := json.Marshal(job)
	return len(b), err
}

// maxListedError is how much of a record's error text a shrunk record keeps.
const maxListedError = 512

// shrink replaces the large parts of a record, largest role first, until
// it encodes within room bytes, and returns it with its encoded size.
func shrink(job api.Job, room int) (api.Job, int) {
	steps := []func(*api.Job){
		func(j *api.Job) {
			if len(j.Op.Args) > 0 {
				j.Op.Args = omitted("arguments", len(j.Op.Args), j.ID)
			}
		},
		func(j *api.Job) {
			if len(j.Result) > 0 {
				j.Result = omitted("result", len(j.Result), j.ID)
			}
		},
		func(j *api.Job) {
			if len(j.Error) > maxListedError {
				j.Error = strings.ToValidUTF8(j.Error[:maxListedError], "") + fmt.Sprintf("… (%d bytes in all)", len(j.Error))
			}
		},
	}
	size := 0
	for _, step := range steps {
		step(&job)
		size, _ = encodedSize(job) // a record that encoded before still does
		if size <= room {
			break
		}
	}
	return job, size
}

// omitted is the note that stands for a part of a record left out of a list.
func omitted(what string, size int, id string) json.RawMessage {
	b, _ := json.Marshal(map[string]string{
		"omitted": fmt.Sprintf("%d bytes of %s, too large for a job list; rbee jobs get %s shows the record", size, what, id),
	})
	return b
}
