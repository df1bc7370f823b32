package hive

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/subjects"
)

// catalogCode maps a catalog error to the code the hive answers:
//
//	ErrNotFound, ErrSourceNotFound                  404
//	ErrExists                                       409
//	ErrInvalidRequest, ErrChecksum, ErrNotGGUF,
//	  subjects.ErrInvalidID                         400
//	ErrNoSpace                                      507 (CodeInsufficientMemory: no room on disk)
//	ErrDownload                                     503 (the source failed; retry later)
//	job cancelled                                   499 (CodeCancelled)
//	deadline exceeded                               504
//	anything else                                   500
func catalogCode(err error) int {
	switch {
	case errors.Is(err, catalog.ErrNotFound), errors.Is(err, catalog.ErrSourceNotFound):
		return api.CodeNotFound
	case errors.Is(err, catalog.ErrExists):
		return api.CodeConflict
	case errors.Is(err, catalog.ErrInvalidRequest), errors.Is(err, catalog.ErrChecksum),
		errors.Is(err, catalog.ErrNotGGUF), errors.Is(err, subjects.ErrInvalidID):
		return api.CodeBadRequest
	case errors.Is(err, catalog.ErrNoSpace):
		return CodeInsufficientMemory
	case errors.Is(err, catalog.ErrDownload):
		return api.CodeUnavailable
	case errors.Is(err, bus.ErrJobCancelled), errors.Is(err, context.Canceled):
		return CodeCancelled
	case errors.Is(err, context.DeadlineExceeded):
		return api.CodeTimeout
	}
	return api.CodeInternal
}

func catalogErr(err error) error {
	return api.Errorf(catalogCode(err), "%s", err.Error())
}

func (h *hive) checkHive(name string) error {
	if name != "" && name != h.cfg.ID {
		return api.Errorf(api.CodeBadRequest, "this is hive %s, not %s", h.cfg.ID, name)
	}
	return nil
}

func (h *hive) modelList(context.Context, struct{}) (api.ModelListReply, error) {
	models, err := h.catalog.List()
	if err != nil {
		return api.ModelListReply{}, api.Errorf(api.CodeInternal, "%v", err)
	}
	return api.ModelListReply{Hive: h.cfg.ID, Models: models}, nil
}

func (h *hive) modelGet(_ context.Context, req api.ModelRequest) (api.Model, error) {
	m, err := h.catalog.Get(req.Model)
	if errors.Is(err, catalog.ErrNotFound) {
		return api.Model{}, api.Errorf(api.CodeNotFound, "model %s is not in hive %s's catalog; see `rbee model list`, or add it with `rbee model download --hive %s SOURCE --name %s`", req.Model, h.cfg.ID, h.cfg.ID, req.Model)
	}
	if err != nil {
		return api.Model{}, catalogErr(err)
	}
	return m, nil
}

// modelDelete refuses to delete a model a worker serves, unless Force, which
// stops those workers first.
func (h *hive) modelDelete(ctx context.Context, req api.ModelRequest) (struct{}, error) {
	if _, err := h.modelGet(ctx, req); err != nil {
		return struct{}{}, err
	}
	users := h.workersOf(req.Model)
	if len(users) > 0 && !req.Force {
		ids := make([]string, len(users))
		for i, w := range users {
			ids[i] = w.id
		}
		return struct{}{}, api.Errorf(api.CodeConflict, "model %s is in use by worker %s; use --force to stop it first",
			req.Model, strings.Join(ids, ", "))
	}
	for _, w := range users {
		h.stopWorker(ctx, w, h.cfg.StopGrace, "")
	}
	if err := h.catalog.Delete(req.Model); err != nil {
		return struct{}{}, catalogErr(err)
	}
	h.modelsChanged()
	h.log.Info().Str("model", req.Model).Msg("model deleted")
	return struct{}{}, nil
}

func (h *hive) modelsChanged() {
	if err := h.refreshModels(); err != nil {
		h.log.Warn().Err(err).Msg("reading the catalog")
	}
	h.kickBeat()
}

// modelAdd downloads a model into the catalog, narrating progress on the
// job. The job's cancel signal stops the download.
func (h *hive) modelAdd(ctx context.Context, args api.ModelAddArgs) (api.Model, error) {
	if err := h.checkHive(args.Hive); err != nil {
		return api.Model{}, err
	}
	if strings.TrimSpace(args.Source) == "" {
		return api.Model{}, api.Errorf(api.CodeBadRequest, "model-add needs a source (https://…, hf:org/repo/file.gguf or file:///path)")
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if args.JobID != "" {
		if err := subjects.ValidateID(subjects.KindJob, args.JobID); err != nil {
			return api.Model{}, api.Errorf(api.CodeBadRequest, "%v", err)
		}
		stop, err := h.bus.OnCancel(args.JobID, 0, cancel)
		if err != nil {
			return api.Model{}, api.Errorf(api.CodeInternal, "listening for job %s's cancel: %v", args.JobID, err)
		}
		defer stop()
		// The subscription must be live before the download starts, or
		// a quick cancel could be missed.
		if err := h.bus.NC.FlushWithContext(ctx); err != nil {
			return api.Model{}, api.Errorf(api.CodeInternal, "listening for job %s's cancel: %v", args.JobID, err)
		}
	}
	file := sourceFile(args.Source)
	h.narrator.Say(ctx, args.JobID, "download", args.Source, "downloading %s onto hive %s", args.Source, h.cfg.ID)
	started := time.Now()
	var progress func(catalog.Progress)
	if args.JobID != "" {
		// Progress belongs to the person following the job; without one
		// it would only flood the cluster subject.
		progress = func(p catalog.Progress) {
			h.narrator.With(ctx, args.JobID, "download", file, progressFields(p), "%s", p.Sentence(file))
		}
	}
	m, err := h.catalog.Add(ctx, catalog.AddRequest{Source: args.Source, Name: args.Name, SHA256: args.SHA256}, progress)
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, bus.ErrJobCancelled) {
			err = fmt.Errorf("%w: %w", cause, err)
		}
		h.narrator.Warn(context.WithoutCancel(ctx), args.JobID, "download", args.Source, "download of %s failed: %v", args.Source, err)
		return api.Model{}, catalogErr(err)
	}
	h.modelsChanged()
	h.narrator.Say(ctx, args.JobID, "added", m.ID, "added %s to hive %s's catalog: %s, %s parameters, needs about %s to run (took %s)",
		m.ID, h.cfg.ID, catalog.HumanBytes(uint64(m.Size)), humanCount(m.Parameters), catalog.HumanBytes(m.EstimatedMemory), time.Since(started).Round(time.Millisecond))
	return m, nil
}

// sourceFile is the file name a source names, for progress sentences.
func sourceFile(source string) string {
	s := source
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		s = s[:i]
	}
	if i := strings.LastIndex(s, "@"); i > strings.LastIndex(s, "/") {
		s = s[:i] // hf:org/repo/file.gguf@rev
	}
	if b := path.Base(s); b != "." && b != "/" && b != "" {
		return b
	}
	return source
}

func progressFields(p catalog.Progress) map[string]any {
	return map[string]any{
		"bytes": p.Bytes, "total": p.Total, "percent": round1(p.Percent),
		"rate": int64(p.BytesPerSec), "eta": p.ETA.Round(time.Second).String(),
		"resumed": p.Resumed,
	}
}

func round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }

func humanCount(n uint64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.1fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return fmt.Sprintf("%d", n)
}

// synthSizes are the generated models model-synth writes.
var synthSizes = map[string]func() gguf.SynthConfig{"tiny": gguf.Tiny, "large": gguf.Large}

// modelSynth writes a generated model into the catalog, so demos and tests
// need no network. Its source is recorded as "synth:<size>".
func (h *hive) modelSynth(ctx context.Context, args api.ModelSynthArgs) (api.Model, error) {
	size := args.Size
	if size == "" {
		size = "tiny"
	}
	cfgFn, ok := synthSizes[size]
	if !ok {
		return api.Model{}, api.Errorf(api.CodeBadRequest, "model size %q is not one of tiny, large", args.Size)
	}
	name := args.Name
	if name == "" {
		name = size
	}
	if err := subjects.ValidateModelID(name); err != nil {
		return api.Model{}, api.Errorf(api.CodeBadRequest, "%v", err)
	}
	if _, err := h.catalog.Get(name); err == nil {
		return api.Model{}, api.Errorf(api.CodeConflict, "model %s is already in hive %s's catalog; delete it first", name, h.cfg.ID)
	}
	tmp, err := os.MkdirTemp(h.cfg.tmpDir(), "synth-")
	if err != nil {
		return api.Model{}, api.Errorf(api.CodeInternal, "synth: %v", err)
	}
	defer os.RemoveAll(tmp)
	file := filepath.Join(tmp, name+".gguf")
	if err := gguf.SynthFile(file, cfgFn()); err != nil {
		return api.Model{}, api.Errorf(api.CodeInternal, "synth %s model: %v", size, err)
	}
	m, err := h.catalog.Add(ctx, catalog.AddRequest{Source: "file://" + file, Name: name}, nil)
	if err != nil {
		return api.Model{}, catalogErr(err)
	}
	m.Source = "synth:" + size
	if err := h.rewriteRecord(m); err != nil {
		h.log.Warn().Err(err).Str("model", m.ID).Msg("recording the synth source")
	}
	h.modelsChanged()
	h.log.Info().Str("model", m.ID).Str("size", size).Msg("synthesised model")
	return m, nil
}

// rewriteRecord replaces a catalog entry's record (catalog.RecordFile, the
// documented layout) in one rename, so a concurrent List never reads half of
// it. Only modelSynth uses it, to record a source the catalog cannot parse.
func (h *hive) rewriteRecord(m api.Model) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	dst := filepath.Join(h.catalog.Dir(), m.ID, catalog.RecordFile)
	tmp, err := os.CreateTemp(h.cfg.tmpDir(), "record-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}
