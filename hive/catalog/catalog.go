// Package catalog is the model catalog of one hive: the GGUF files this
// machine holds, each with the metadata the scheduler needs (architecture,
// size, memory estimate) so a model can be placed without opening its file.
//
// On disk a catalog is a directory with one folder per model id:
//
//	<dir>/<id>/model.gguf   the model file
//	<dir>/<id>/model.json   its api.Model record
//	<dir>/.partial/         downloads and copies in progress
//
// A folder appears under <dir> only by one atomic rename, after the file was
// downloaded, verified and described, so a crash or a failed Add never leaves
// a half model in the catalog. Open empties .partial, which holds only the
// debris of adds that did not finish.
package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

const (
	// ModelFile is the name of the model file inside a model's folder.
	ModelFile = "model.gguf"
	// RecordFile is the name of the api.Model record inside a model's folder.
	RecordFile = "model.json"
	// partialDir holds adds in progress; its leading dot keeps it out of the
	// id space (ValidateModelID refuses a leading '.').
	partialDir = ".partial"
)

// Sentinel errors. Every error the catalog returns wraps at most one of these
// (plus, for names, subjects.ErrInvalidID), so callers branch with errors.Is
// and show the message, which says what to do.
var (
	// ErrNotFound: no model with that id in this catalog.
	ErrNotFound = errors.New("model not found")
	// ErrExists: a model with that id is already in the catalog or being added.
	ErrExists = errors.New("model already exists")
	// ErrInUse is for the hive: the catalog does not know about workers, so
	// the hive refuses a Delete of a loaded model with this error itself.
	ErrInUse = errors.New("model in use")
	// ErrInvalidRequest: the source, name or checksum of an AddRequest is
	// malformed; the message names the field.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrSourceNotFound: the source answered 404/410, or the local file is missing.
	ErrSourceNotFound = errors.New("model source not found")
	// ErrDownload: the source failed in another way (HTTP status, network)
	// and retries did not help.
	ErrDownload = errors.New("download failed")
	// ErrNoSpace: the disk holding the catalog has less free space than the
	// model needs.
	ErrNoSpace = errors.New("not enough disk space")
	// ErrChecksum: the file's sha256 differs from the one requested.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrNotGGUF: the file is not a GGUF model that llama.cpp can run.
	ErrNotGGUF = errors.New("not a GGUF model")
)

// Catalog is the model catalog in one directory. It is safe for concurrent
// use: the mutex mu is the single owner of the catalog's visible state — the
// set of model folders and the ids being added. Every rename into or out of
// <dir>, and every read of a model folder, happens under it; the slow part of
// Add (download, hashing, parsing) runs outside it on files in .partial that
// only that Add touches, because its id is reserved in adding.
//
// Open one Catalog per directory: Open clears .partial, which would destroy
// the work of another Catalog adding into the same directory.
type Catalog struct {
	dir  string
	opts options

	mu     sync.Mutex
	adding map[string]struct{}
}

// Option configures a Catalog.
type Option func(*options)

// options is the one settings table of a catalog.
type options struct {
	// hubBase is where hf: sources resolve.
	hubBase string
	// client fetches http(s) sources. Its Timeout, if any, bounds a whole
	// download, so the default has none; stalls are caught by stallTimeout.
	client *http.Client
	// progressInterval is the least time between two progress callbacks.
	progressInterval time.Duration
	// contextForEstimate is the context length the memory estimate assumes.
	contextForEstimate int
	// freeDisk reports the free bytes of the filesystem holding path.
	freeDisk func(path string) (uint64, error)
	// now is the clock for progress rates and AddedAt.
	now func() time.Time
	// stallTimeout aborts (and resumes) a transfer that received no byte
	// for this long; without it a silent peer would hang Add until ctx ends.
	stallTimeout time.Duration
	// retries bounds consecutive failed attempts of one download.
	retries int
	// backoff is the wait before the first retry; it doubles per failure.
	backoff time.Duration
}

func defaultOptions() options {
	return options{
		hubBase:            DefaultHubBase,
		client:             &http.Client{},
		progressInterval:   500 * time.Millisecond,
		contextForEstimate: 4096,
		freeDisk:           freeDisk,
		now:                time.Now,
		stallTimeout:       60 * time.Second,
		retries:            5,
		backoff:            100 * time.Millisecond,
	}
}

// DefaultHubBase is where hf: sources resolve unless WithHubBase says otherwise.
const DefaultHubBase = "https://huggingface.co"

// WithHubBase sets the Hugging Face base URL that hf: sources resolve
// against, e.g. a mirror or a test server.
func WithHubBase(base string) Option {
	return func(o *options) { o.hubBase = strings.TrimRight(base, "/") }
}

// WithHTTPClient sets the client for http(s) and hf: sources. A Timeout on it
// bounds whole downloads, so leave it zero for large models.
func WithHTTPClient(c *http.Client) Option {
	return func(o *options) {
		if c != nil {
			o.client = c
		}
	}
}

// WithProgressInterval sets the least time between two progress callbacks
// of one Add (default 500ms). The final callback is always delivered.
func WithProgressInterval(d time.Duration) Option {
	return func(o *options) { o.progressInterval = d }
}

// WithContextForEstimate sets the context length, in tokens, that the memory
// estimate of each added model assumes (default 4096).
func WithContextForEstimate(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.contextForEstimate = n
		}
	}
}

// WithFreeDisk replaces the free-space probe (default statfs). An error from
// it skips the space check rather than failing the Add.
func WithFreeDisk(f func(path string) (uint64, error)) Option {
	return func(o *options) {
		if f != nil {
			o.freeDisk = f
		}
	}
}

// WithClock replaces the clock used for progress rates, throttling and AddedAt.
func WithClock(now func() time.Time) Option {
	return func(o *options) {
		if now != nil {
			o.now = now
		}
	}
}

// WithStallTimeout sets how long a download may receive nothing before the
// attempt is abandoned and resumed (default 60s).
func WithStallTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.stallTimeout = d
		}
	}
}

// WithRetries sets how many consecutive failed attempts a download survives
// (default 5) and the wait before the first retry, which doubles per failure
// up to 2s (default 100ms). Attempts that received bytes reset the count.
func WithRetries(n int, backoff time.Duration) Option {
	return func(o *options) {
		if n >= 0 {
			o.retries = n
		}
		if backoff > 0 {
			o.backoff = backoff
		}
	}
}

// Open opens (creating if needed) the catalog in dir and discards the debris
// of adds that did not finish.
func Open(dir string, opts ...Option) (*Catalog, error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("catalog: directory %q: %w", dir, err)
	}
	// Whatever is in .partial belongs to an Add that did not finish (a crash,
	// a kill); nothing can resume it, so it only wastes disk.
	if err := os.RemoveAll(filepath.Join(abs, partialDir)); err != nil {
		return nil, fmt.Errorf("catalog: clearing unfinished downloads in %s: %w", abs, err)
	}
	if err := os.MkdirAll(filepath.Join(abs, partialDir), 0o755); err != nil {
		return nil, fmt.Errorf("catalog: creating %s: %w; check the path and its permissions", abs, err)
	}
	return &Catalog{dir: abs, opts: o, adding: map[string]struct{}{}}, nil
}

// Dir is the catalog's directory, absolute.
func (c *Catalog) Dir() string { return c.dir }

// List returns every model in the catalog, sorted by id. Folders that are
// not catalog entries (no readable model.json) are skipped.
func (c *Catalog) List() ([]api.Model, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	entries, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("catalog: reading %s: %w", c.dir, err)
	}
	models := []api.Model{}
	for _, e := range entries {
		if !e.IsDir() || subjects.ValidateModelID(e.Name()) != nil {
			continue // .partial, and anything a person put there by hand
		}
		m, err := c.readRecord(e.Name())
		if err != nil {
			continue
		}
		models = append(models, m)
	}
	sort.Slice(models, func(i, j int) bool { return models[i].ID < models[j].ID })
	return models, nil
}

// Get returns the model with that id, or an error wrapping ErrNotFound.
func (c *Catalog) Get(id string) (api.Model, error) {
	if err := subjects.ValidateModelID(id); err != nil {
		return api.Model{}, fmt.Errorf("catalog: %w: %w", ErrNotFound, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readRecord(id)
}

// Delete removes the model with that id and its file, or returns an error
// wrapping ErrNotFound. Whether the model is loaded is the caller's question
// (see ErrInUse).
func (c *Catalog) Delete(id string) error {
	if err := subjects.ValidateModelID(id); err != nil {
		return fmt.Errorf("catalog: %w: %w", ErrNotFound, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	folder := filepath.Join(c.dir, id)
	if _, err := os.Stat(folder); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("catalog: %w: %q; list the catalog to see what this hive has", ErrNotFound, id)
	}
	// Move the folder out of the catalog in one step, then remove it, so a
	// crash midway leaves debris in .partial (cleared by Open), never a
	// folder with a record and no file.
	trash, err := os.MkdirTemp(filepath.Join(c.dir, partialDir), "deleted-"+id+"-")
	if err != nil {
		return fmt.Errorf("catalog: deleting %q: %w", id, err)
	}
	defer os.RemoveAll(trash)
	if err := os.Rename(folder, filepath.Join(trash, id)); err != nil {
		return fmt.Errorf("catalog: deleting %q: %w", id, err)
	}
	return nil
}

// readRecord loads one entry; the caller holds mu. Path is recomputed from
// the catalog directory so a catalog that was moved still points at its files.
func (c *Catalog) readRecord(id string) (api.Model, error) {
	data, err := os.ReadFile(filepath.Join(c.dir, id, RecordFile))
	if errors.Is(err, fs.ErrNotExist) {
		return api.Model{}, fmt.Errorf("catalog: %w: %q; list the catalog to see what this hive has", ErrNotFound, id)
	}
	if err != nil {
		return api.Model{}, fmt.Errorf("catalog: reading model %q: %w", id, err)
	}
	var m api.Model
	if err := json.Unmarshal(data, &m); err != nil {
		return api.Model{}, fmt.Errorf("catalog: model %q has a corrupt %s (%v); delete it and add it again", id, RecordFile, err)
	}
	m.ID = id
	m.Path = filepath.Join(c.dir, id, ModelFile)
	return m, nil
}

// reserve claims id for one Add, so two Adds of the same id cannot race on
// the same partial file, and a finished model is never overwritten.
func (c *Catalog) reserve(id string) (release func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, busy := c.adding[id]; busy {
		return nil, fmt.Errorf("catalog: %w: %q is being added right now; wait for that to finish", ErrExists, id)
	}
	if _, err := os.Lstat(filepath.Join(c.dir, id)); err == nil {
		return nil, fmt.Errorf("catalog: %w: %q is already in the catalog; delete it first or choose another name", ErrExists, id)
	}
	c.adding[id] = struct{}{}
	return func() {
		c.mu.Lock()
		delete(c.adding, id)
		c.mu.Unlock()
	}, nil
}

// commit moves a finished staging folder into the catalog in one rename.
func (c *Catalog) commit(id, staging string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	target := filepath.Join(c.dir, id)
	// rename(2) would replace an empty directory, so check first: a folder
	// made by hand meanwhile must not be clobbered.
	if _, err := os.Lstat(target); err == nil {
		return fmt.Errorf("catalog: %w: %q appeared while it was being added; delete it first or choose another name", ErrExists, id)
	}
	if err := os.Rename(staging, target); err != nil {
		return fmt.Errorf("catalog: adding %q: %w", id, err)
	}
	syncDir(c.dir)
	return nil
}

// syncDir makes a rename in dir durable; failures only cost durability.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// ctxErr describes a cancelled Add, keeping the cause for errors.Is.
func ctxErr(ctx context.Context, id string) error {
	return fmt.Errorf("catalog: adding %q stopped: %w", id, context.Cause(ctx))
}
