package catalog

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// AddRequest asks the catalog to fetch a model.
type AddRequest struct {
	// Source is https://…, http://…, hf:org/repo/file.gguf[@rev] or
	// file:///abs/path (see ParseSource).
	Source string
	// Name is the model id; empty means the source's file name without .gguf.
	Name string
	// SHA256, when set (64 hex digits), must match the file's hash.
	SHA256 string
}

// Add fetches a model into the catalog and returns its record. progress, if
// not nil, is called from Add's goroutine at most once per progress interval
// plus once at the end, so it must not block for long.
//
// Add either puts a complete, verified, described model into the catalog or
// leaves nothing behind: on any failure, or when ctx ends (which stops the
// transfer promptly), the partial file is removed and no folder appears.
func (c *Catalog) Add(ctx context.Context, req AddRequest, progress func(Progress)) (api.Model, error) {
	src, err := ParseSource(req.Source, c.opts.hubBase)
	if err != nil {
		return api.Model{}, err
	}
	id := req.Name
	if id == "" {
		id = nameFromSource(src)
		if err := subjects.ValidateModelID(id); err != nil {
			return api.Model{}, fmt.Errorf("catalog: %w: field \"name\" (taken from the source's file name) is not a valid model id; pass a name: %w", ErrInvalidRequest, err)
		}
	} else if err := subjects.ValidateModelID(id); err != nil {
		return api.Model{}, fmt.Errorf("catalog: %w: field \"name\": %w", ErrInvalidRequest, err)
	}
	key, err := subjects.ModelKey(id)
	if err != nil {
		return api.Model{}, fmt.Errorf("catalog: %w: field \"name\": %w", ErrInvalidRequest, err)
	}
	want := strings.ToLower(strings.TrimSpace(req.SHA256))
	if want != "" {
		if b, err := hex.DecodeString(want); err != nil || len(b) != sha256.Size {
			return api.Model{}, fmt.Errorf("catalog: %w: field \"sha256\" %q is not 64 hex digits", ErrInvalidRequest, req.SHA256)
		}
	}

	release, err := c.reserve(id)
	if err != nil {
		return api.Model{}, err
	}
	defer release()

	partial := filepath.Join(c.partialPath(), id+".part")
	staging := filepath.Join(c.partialPath(), id+".staging")
	committed := false
	// The single cleanup path: whatever went wrong, nothing of this Add stays.
	defer func() {
		if !committed {
			os.Remove(partial)
			os.RemoveAll(staging)
		}
	}()

	f, err := os.OpenFile(partial, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return api.Model{}, fmt.Errorf("catalog: adding %q: %w", id, err)
	}
	s := &sink{f: f, h: sha256.New(), meter: newMeter(progress, c.opts.now, c.opts.progressInterval)}
	if src.Scheme == "file" {
		err = c.copyFile(ctx, src.Path, s)
	} else {
		err = c.download(ctx, src, s)
	}
	if err == nil {
		if err = f.Sync(); err != nil {
			err = fmt.Errorf("catalog: adding %q: %w", id, err)
		}
	}
	f.Close()
	if ctx.Err() != nil {
		return api.Model{}, ctxErr(ctx, id)
	}
	if err != nil {
		return api.Model{}, err // already says what failed and what to do
	}
	s.meter.finish()

	sum := hex.EncodeToString(s.h.Sum(nil))
	if want != "" && sum != want {
		return api.Model{}, fmt.Errorf("catalog: %w: %q from %s has sha256 %s, expected %s; the file is corrupt or the checksum is for another file",
			ErrChecksum, id, req.Source, sum, want)
	}
	info, err := inspect(partial, c.opts.contextForEstimate)
	if errors.Is(err, errTruncated) {
		return api.Model{}, fmt.Errorf("catalog: %w: %s: %w", ErrNotGGUF, req.Source, err) // says what to do
	}
	if err != nil {
		return api.Model{}, fmt.Errorf("catalog: %w: %s: %w; check that the source is a .gguf model file", ErrNotGGUF, req.Source, err)
	}

	m := api.Model{
		ID:                  id,
		Key:                 key,
		Source:              req.Source,
		Path:                filepath.Join(c.dir, id, ModelFile),
		Size:                s.n,
		SHA256:              sum,
		Architecture:        info.architecture,
		Parameters:          info.parameters,
		Quantization:        info.quantization,
		ContextLength:       info.contextLength,
		EstimatedMemory:     info.estimatedMemory,
		EstimatedForContext: info.estimatedForContext,
		AddedAt:             c.opts.now().UTC(),
	}
	if err := writeStaging(staging, partial, m); err != nil {
		return api.Model{}, fmt.Errorf("catalog: adding %q: %w", id, err)
	}
	if ctx.Err() != nil {
		return api.Model{}, ctxErr(ctx, id)
	}
	if err := c.commit(id, staging); err != nil {
		return api.Model{}, err
	}
	committed = true
	return m, nil
}

// writeStaging assembles the model folder in .partial, ready to be renamed
// into the catalog.
func writeStaging(staging, partial string, m api.Model) error {
	if err := os.Mkdir(staging, 0o755); err != nil {
		return err
	}
	if err := os.Rename(partial, filepath.Join(staging, ModelFile)); err != nil {
		return err
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	rf, err := os.Create(filepath.Join(staging, RecordFile))
	if err != nil {
		return err
	}
	if _, err := rf.Write(append(data, '\n')); err != nil {
		rf.Close()
		return err
	}
	if err := rf.Sync(); err != nil {
		rf.Close()
		return err
	}
	if err := rf.Close(); err != nil {
		return err
	}
	syncDir(staging)
	return nil
}

func (c *Catalog) partialPath() string { return filepath.Join(c.dir, partialDir) }
