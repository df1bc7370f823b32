package catalog_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/subjects"
)

var (
	tinyOnce  sync.Once
	tinyBytes []byte
	tinyErr   error
)

// tiny is the shared synthetic llama model, generated once per test binary.
func tiny(t *testing.T) []byte {
	t.Helper()
	tinyOnce.Do(func() {
		var buf bytes.Buffer
		tinyErr = gguf.Synth(&buf, gguf.Tiny())
		tinyBytes = buf.Bytes()
	})
	require.NoError(t, tinyErr)
	return tinyBytes
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func open(t *testing.T, opts ...catalog.Option) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Open(t.TempDir(), opts...)
	require.NoError(t, err)
	return c
}

func serve(t *testing.T, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// serveBytes serves data with Range support, counting requests.
func serveBytes(t *testing.T, data []byte, hits *atomic.Int32) *httptest.Server {
	return serve(t, func(w http.ResponseWriter, r *http.Request) {
		if hits != nil {
			hits.Add(1)
		}
		http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(data))
	})
}

// requireNothingLeft asserts the promise of a failed Add: no folder for the
// id and nothing in .partial.
func requireNothingLeft(t *testing.T, c *catalog.Catalog, id string) {
	t.Helper()
	_, err := os.Stat(filepath.Join(c.Dir(), id))
	require.ErrorIs(t, err, os.ErrNotExist, "model folder must not exist")
	left, err := os.ReadDir(filepath.Join(c.Dir(), ".partial"))
	require.NoError(t, err)
	require.Empty(t, left, ".partial must be empty")
	models, err := c.List()
	require.NoError(t, err)
	require.Empty(t, models)
}

// stepClock advances one step on every call, so throttling is decided by
// the number of clock reads (one per chunk written), not by wall time.
type stepClock struct {
	mu    sync.Mutex
	t     time.Time
	step  time.Duration
	calls int
	tick  chan struct{}
}

func newStepClock(step time.Duration) *stepClock {
	return &stepClock{t: time.Unix(1_700_000_000, 0), step: step, tick: make(chan struct{}, 1<<16)}
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(c.step)
	c.calls++
	select {
	case c.tick <- struct{}{}:
	default:
	}
	return c.t
}

func TestAddHTTPProgress(t *testing.T) {
	data := tiny(t)
	const chunk = 8 << 10
	chunks := (len(data) + chunk - 1) / chunk
	clock := newStepClock(100 * time.Millisecond)
	srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		for off := 0; off < len(data); off += chunk {
			_, err := w.Write(data[off:min(off+chunk, len(data))])
			if err != nil {
				return
			}
			w.(http.Flusher).Flush()
			// Pace the body by the client: the next chunk goes out only after
			// the catalog wrote something (each write reads the clock).
			select {
			case <-clock.tick:
			case <-r.Context().Done():
				return
			case <-time.After(5 * time.Second):
				t.Error("client stopped reading")
				return
			}
		}
	})
	c := open(t, catalog.WithClock(clock.Now), catalog.WithProgressInterval(500*time.Millisecond))

	var events []catalog.Progress
	m, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/tiny.gguf"}, func(p catalog.Progress) {
		events = append(events, p)
	})
	require.NoError(t, err)
	assert.Equal(t, "tiny", m.ID)
	assert.Equal(t, sha(data), m.SHA256)

	require.NotEmpty(t, events)
	t.Logf("%d events for %d chunks of a %d-byte model", len(events), chunks, len(data))
	assert.Less(t, len(events), chunks, "progress must be throttled")
	assert.GreaterOrEqual(t, len(events), 3, "expected intermediate progress, got %+v", events)
	for i := 1; i < len(events); i++ {
		assert.GreaterOrEqual(t, events[i].Bytes, events[i-1].Bytes)
	}
	mid := events[len(events)/2]
	assert.Equal(t, int64(len(data)), mid.Total)
	assert.Greater(t, mid.BytesPerSec, 0.0)
	assert.Greater(t, mid.ETA, time.Duration(0))
	last := events[len(events)-1]
	assert.Equal(t, int64(len(data)), last.Bytes)
	assert.Equal(t, int64(len(data)), last.Total)
	assert.Equal(t, 100.0, last.Percent)
	assert.Zero(t, last.ETA)
}

func TestAddResume(t *testing.T) {
	data := tiny(t)
	half := len(data) / 2
	cases := []struct {
		name string
		// second answers the request after the drop.
		second func(w http.ResponseWriter, r *http.Request)
	}{
		{"server honours Range", func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(data))
		}},
		{"server ignores Range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data)
		}},
		{"server sends the wrong range", func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") == "" {
				w.Write(data)
				return
			}
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(data)-1, len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var ranges []string
			srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				ranges = append(ranges, r.Header.Get("Range"))
				n := len(ranges)
				mu.Unlock()
				if n > 1 {
					tc.second(w, r)
					return
				}
				// First request: half the body, then the connection dies.
				w.Header().Set("Content-Length", strconv.Itoa(len(data)))
				w.Write(data[:half])
				w.(http.Flusher).Flush()
				conn, _, err := http.NewResponseController(w).Hijack()
				if !assert.NoError(t, err) {
					return
				}
				conn.Close()
			})
			c := open(t, catalog.WithRetries(5, time.Millisecond))
			m, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/tiny.gguf", SHA256: sha(data)}, nil)
			require.NoError(t, err)
			assert.Equal(t, sha(data), m.SHA256)
			assert.Equal(t, int64(len(data)), m.Size)

			mu.Lock()
			defer mu.Unlock()
			require.GreaterOrEqual(t, len(ranges), 2)
			assert.Empty(t, ranges[0])
			assert.Regexp(t, `^bytes=[1-9][0-9]*-$`, ranges[1], "the retry must resume with a Range header")
			got, err := os.ReadFile(m.Path)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(data, got))
			left, err := os.ReadDir(filepath.Join(c.Dir(), ".partial"))
			require.NoError(t, err)
			assert.Empty(t, left)
		})
	}
}

func TestAddResumesAfterStall(t *testing.T) {
	data := tiny(t)
	var hits atomic.Int32
	srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
		if hits.Add(1) == 1 {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data[:len(data)/3])
			w.(http.Flusher).Flush()
			<-r.Context().Done() // a peer that goes silent
			return
		}
		http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(data))
	})
	c := open(t, catalog.WithStallTimeout(200*time.Millisecond), catalog.WithRetries(3, time.Millisecond))
	m, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/tiny.gguf"}, nil)
	require.NoError(t, err)
	assert.Equal(t, sha(data), m.SHA256)
	assert.EqualValues(t, 2, hits.Load())
}

func TestAddFailuresLeaveNothing(t *testing.T) {
	data := tiny(t)
	garbage := bytes.Repeat([]byte("not a model "), 4096)
	var shard bytes.Buffer
	w := gguf.NewWriter()
	w.AddString("general.architecture", "llama")
	w.AddUint16("split.no", 0)
	w.AddUint16("split.count", 3)
	w.AddTensorF32("token_embd.weight", []uint64{4, 2}, make([]float32, 8))
	_, err := w.WriteTo(&shard)
	require.NoError(t, err)
	wrongSum := strings.Repeat("ab", 32)
	cases := []struct {
		name     string
		body     []byte
		status   int
		sha      string
		opts     []catalog.Option
		want     error
		contains []string
	}{
		{name: "sha256 mismatch", body: data, sha: wrongSum, want: catalog.ErrChecksum,
			contains: []string{wrongSum, sha(data)}},
		{name: "not gguf", body: garbage, want: catalog.ErrNotGGUF, contains: []string{"invalid GGUF format"}},
		{name: "split shard", body: shard.Bytes(), want: catalog.ErrNotGGUF, contains: []string{"3 shards", "llama-gguf-split"}},
		{name: "404", status: http.StatusNotFound, want: catalog.ErrSourceNotFound, contains: []string{"/m.gguf", "404"}},
		{name: "403", status: http.StatusForbidden, want: catalog.ErrDownload, contains: []string{"403"}},
		{name: "500 after retries", status: http.StatusInternalServerError, want: catalog.ErrDownload,
			opts: []catalog.Option{catalog.WithRetries(2, time.Millisecond)}, contains: []string{"500", "3 failed attempts"}},
		{name: "no space", body: data, want: catalog.ErrNoSpace,
			opts:     []catalog.Option{catalog.WithFreeDisk(func(string) (uint64, error) { return 1 << 10, nil })},
			contains: []string{"needs " + catalog.HumanBytes(uint64(len(data))), "1.0 KiB free on", ".partial"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.status != 0 {
					http.Error(w, "no", tc.status)
					return
				}
				http.ServeContent(w, r, "m.gguf", time.Time{}, bytes.NewReader(tc.body))
			})
			c := open(t, tc.opts...)
			_, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/m.gguf", SHA256: tc.sha}, nil)
			require.ErrorIs(t, err, tc.want)
			for _, s := range tc.contains {
				assert.Contains(t, err.Error(), s)
			}
			requireNothingLeft(t, c, "m")
		})
	}
}

func TestAddRefusesBadRequests(t *testing.T) {
	var hits atomic.Int32
	srv := serveBytes(t, tiny(t), &hits)
	cases := []struct {
		name, source, id, sha string
		field                 string
		invalidID             bool
	}{
		{name: "traversal", source: srv.URL + "/x.gguf", id: "../x", field: `"name"`, invalidID: true},
		{name: "slash", source: srv.URL + "/x.gguf", id: "a/b", field: `"name"`, invalidID: true},
		{name: "hidden", source: srv.URL + "/x.gguf", id: ".partial", field: `"name"`, invalidID: true},
		{name: "space", source: srv.URL + "/x.gguf", id: "a b", field: `"name"`, invalidID: true},
		{name: "name from source", source: srv.URL + "/bad%20name.gguf", field: `"name"`, invalidID: true},
		{name: "bad sha", source: srv.URL + "/x.gguf", sha: "abc", field: `"sha256"`},
		{name: "bad scheme", source: "ftp://host/x.gguf", field: `"source"`},
		{name: "relative file", source: "file:x.gguf", field: `"source"`},
		{name: "empty source", field: `"source"`},
		{name: "hf too short", source: "hf:org/x.gguf", field: `"source"`},
		{name: "hf traversal", source: "hf:org/repo/../../x.gguf", field: `"source"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := open(t)
			_, err := c.Add(context.Background(), catalog.AddRequest{Source: tc.source, Name: tc.id, SHA256: tc.sha}, nil)
			require.ErrorIs(t, err, catalog.ErrInvalidRequest)
			assert.Contains(t, err.Error(), tc.field)
			if tc.invalidID {
				assert.ErrorIs(t, err, subjects.ErrInvalidID)
			}
			requireNothingLeft(t, c, "x")
		})
	}
	assert.Zero(t, hits.Load(), "a refused request must not reach the source")
}

func TestAddCancelMidDownload(t *testing.T) {
	data := tiny(t)
	handlerDone := make(chan struct{})
	srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
		defer close(handlerDone)
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data[:len(data)/2])
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	c := open(t, catalog.WithProgressInterval(0))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := c.Add(ctx, catalog.AddRequest{Source: srv.URL + "/tiny.gguf"}, func(p catalog.Progress) {
		if p.Bytes > 0 {
			cancel()
		}
	})
	require.ErrorIs(t, err, context.Canceled)
	requireNothingLeft(t, c, "tiny")
	select {
	case <-handlerDone: // the connection was closed, not left hanging
	case <-time.After(5 * time.Second):
		t.Fatal("the request was not aborted")
	}
}

func TestAddConcurrentSameID(t *testing.T) {
	data := tiny(t)
	started := make(chan struct{})
	release := make(chan struct{})
	srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		http.ServeContent(w, r, "m.gguf", time.Time{}, bytes.NewReader(data))
	})
	c := open(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/m.gguf"}, nil)
		done <- err
	}()
	<-started
	_, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/other.gguf", Name: "m"}, nil)
	require.ErrorIs(t, err, catalog.ErrExists)
	assert.Contains(t, err.Error(), "being added")
	close(release)
	require.NoError(t, <-done)

	_, err = c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/m.gguf"}, nil)
	require.ErrorIs(t, err, catalog.ErrExists)
	assert.Contains(t, err.Error(), "already in the catalog")
}

func TestParseSource(t *testing.T) {
	cases := []struct{ in, want string }{
		{"https://example.com/a/b.gguf", "https://example.com/a/b.gguf"},
		{"http://127.0.0.1:8080/x.gguf?download=1", "http://127.0.0.1:8080/x.gguf?download=1"},
		{"hf:org/repo/file.gguf", "https://hub.test/org/repo/resolve/main/file.gguf"},
		{"hf:org/repo/sub/file.gguf@v1.0", "https://hub.test/org/repo/resolve/v1.0/sub/file.gguf"},
		{"hf:org/repo/file.gguf@refs/pr/1", "https://hub.test/org/repo/resolve/refs%2Fpr%2F1/file.gguf"},
		{"file:///models/x.gguf", "file:///models/x.gguf"},
		{"file://localhost/models/x.gguf", "file:///models/x.gguf"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			u, err := catalog.ParseSource(tc.in, "https://hub.test/")
			require.NoError(t, err)
			assert.Equal(t, tc.want, u.String())
		})
	}
	for _, bad := range []string{"", "x.gguf", "/abs/x.gguf", "file://otherhost/x.gguf", "hf:org/repo", "hf:org/repo/x.gguf@", "s3://b/x.gguf", "https:///x.gguf"} {
		_, err := catalog.ParseSource(bad, "https://hub.test")
		assert.ErrorIs(t, err, catalog.ErrInvalidRequest, "%q", bad)
	}
}

func TestAddFromHub(t *testing.T) {
	data := tiny(t)
	var mu sync.Mutex
	var paths []string
	hub := serve(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.EscapedPath())
		mu.Unlock()
		switch r.URL.EscapedPath() {
		case "/org/repo/resolve/main/tiny-f32.gguf":
			// The real hub redirects to a CDN; follow it like a client must.
			http.Redirect(w, r, "/cdn/blob", http.StatusFound)
		case "/cdn/blob", "/org/repo/resolve/v2/tiny-f32.gguf":
			http.ServeContent(w, r, "tiny.gguf", time.Time{}, bytes.NewReader(data))
		default:
			http.NotFound(w, r)
		}
	})
	c := open(t, catalog.WithHubBase(hub.URL))

	m, err := c.Add(context.Background(), catalog.AddRequest{Source: "hf:org/repo/tiny-f32.gguf"}, nil)
	require.NoError(t, err)
	assert.Equal(t, "tiny-f32", m.ID)
	assert.Equal(t, "hf:org/repo/tiny-f32.gguf", m.Source)

	m, err = c.Add(context.Background(), catalog.AddRequest{Source: "hf:org/repo/tiny-f32.gguf@v2", Name: "tiny-v2"}, nil)
	require.NoError(t, err)
	assert.Equal(t, sha(data), m.SHA256)

	_, err = c.Add(context.Background(), catalog.AddRequest{Source: "hf:org/repo/missing.gguf"}, nil)
	require.ErrorIs(t, err, catalog.ErrSourceNotFound)
	assert.Contains(t, err.Error(), hub.URL+"/org/repo/resolve/main/missing.gguf")

	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []string{"/org/repo/resolve/main/tiny-f32.gguf", "/cdn/blob", "/org/repo/resolve/v2/tiny-f32.gguf", "/org/repo/resolve/main/missing.gguf"}, paths)
}

func TestAddFromFile(t *testing.T) {
	data := tiny(t)
	src := filepath.Join(t.TempDir(), "Local.Model.gguf")
	require.NoError(t, os.WriteFile(src, data, 0o644))
	c := open(t)

	var last catalog.Progress
	m, err := c.Add(context.Background(), catalog.AddRequest{Source: "file://" + src}, func(p catalog.Progress) { last = p })
	require.NoError(t, err)
	assert.Equal(t, "Local.Model", m.ID)
	assert.NotEqual(t, m.ID, m.Key, "ids with '.' get a derived key")
	assert.Equal(t, sha(data), m.SHA256)
	assert.Equal(t, 100.0, last.Percent)
	assert.Equal(t, int64(len(data)), last.Bytes)
	src2, err := os.ReadFile(src)
	require.NoError(t, err)
	assert.Equal(t, data, src2, "the source is copied, not moved")

	_, err = c.Add(context.Background(), catalog.AddRequest{Source: "file://" + src + ".missing"}, nil)
	require.ErrorIs(t, err, catalog.ErrSourceNotFound)
	_, err = c.Add(context.Background(), catalog.AddRequest{Source: "file://" + filepath.Dir(src), Name: "dir"}, nil)
	require.ErrorIs(t, err, catalog.ErrInvalidRequest)
}

func TestMetadata(t *testing.T) {
	data := tiny(t)
	srv := serveBytes(t, data, nil)
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	c := open(t, catalog.WithClock(func() time.Time { return now }))

	m, err := c.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/tiny.gguf", Name: "tiny"}, nil)
	require.NoError(t, err)
	assert.Equal(t, "tiny", m.Key)
	assert.Equal(t, "llama", m.Architecture)
	assert.Equal(t, 2048, m.ContextLength)
	assert.Equal(t, "F32", m.Quantization)
	assert.Greater(t, m.Parameters, uint64(0))
	assert.Greater(t, m.EstimatedMemory, uint64(len(data)), "weights plus KV cache")
	assert.Equal(t, 2048, m.EstimatedForContext, "capped at the training context")
	assert.Equal(t, int64(len(data)), m.Size)
	assert.Equal(t, filepath.Join(c.Dir(), "tiny", catalog.ModelFile), m.Path)
	assert.True(t, m.AddedAt.Equal(now))

	// The record on disk is what Get returns, and survives reopening.
	c2, err := catalog.Open(c.Dir())
	require.NoError(t, err)
	got, err := c2.Get("tiny")
	require.NoError(t, err)
	got.AddedAt, m.AddedAt = got.AddedAt.UTC(), m.AddedAt.UTC()
	assert.Equal(t, m, got)

	small := open(t, catalog.WithContextForEstimate(256))
	m2, err := small.Add(context.Background(), catalog.AddRequest{Source: srv.URL + "/tiny.gguf"}, nil)
	require.NoError(t, err)
	t.Logf("estimate: %s at %d ctx, %s at 256; params %d", catalog.HumanBytes(m.EstimatedMemory), m.EstimatedForContext, catalog.HumanBytes(m2.EstimatedMemory), m.Parameters)
	assert.Equal(t, 256, m2.EstimatedForContext)
	assert.Less(t, m2.EstimatedMemory, m.EstimatedMemory, "a smaller context needs less memory")
}

func TestListGetDelete(t *testing.T) {
	srv := serveBytes(t, tiny(t), nil)
	c := open(t)
	ctx := context.Background()

	models, err := c.List()
	require.NoError(t, err)
	assert.Empty(t, models)

	for _, id := range []string{"zeta", "alpha", "mid.1"} {
		_, err := c.Add(ctx, catalog.AddRequest{Source: srv.URL + "/tiny.gguf", Name: id}, nil)
		require.NoError(t, err)
	}
	// Things that are not entries: a stray folder, a file.
	require.NoError(t, os.Mkdir(filepath.Join(c.Dir(), "stray"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(c.Dir(), "README"), []byte("x"), 0o644))

	models, err = c.List()
	require.NoError(t, err)
	var ids []string
	for _, m := range models {
		ids = append(ids, m.ID)
	}
	assert.Equal(t, []string{"alpha", "mid.1", "zeta"}, ids)

	m, err := c.Get("mid.1")
	require.NoError(t, err)
	assert.Equal(t, "mid.1", m.ID)
	assert.FileExists(t, m.Path)

	for _, id := range []string{"nope", "../alpha", "stray"} {
		_, err = c.Get(id)
		assert.ErrorIs(t, err, catalog.ErrNotFound, id)
	}

	require.NoError(t, c.Delete("alpha"))
	_, err = c.Get("alpha")
	require.ErrorIs(t, err, catalog.ErrNotFound)
	require.ErrorIs(t, c.Delete("alpha"), catalog.ErrNotFound)
	require.ErrorIs(t, c.Delete("../zeta"), catalog.ErrNotFound)
	assert.NoDirExists(t, filepath.Join(c.Dir(), "alpha"))
	left, err := os.ReadDir(filepath.Join(c.Dir(), ".partial"))
	require.NoError(t, err)
	assert.Empty(t, left)

	models, err = c.List()
	require.NoError(t, err)
	assert.Len(t, models, 2)

	// A deleted id can be added again.
	_, err = c.Add(ctx, catalog.AddRequest{Source: srv.URL + "/tiny.gguf", Name: "alpha"}, nil)
	require.NoError(t, err)
}

func TestOpenClearsUnfinished(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, ".partial", "x.staging"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".partial", "x.part"), []byte("half"), 0o644))
	c, err := catalog.Open(dir)
	require.NoError(t, err)
	left, err := os.ReadDir(filepath.Join(c.Dir(), ".partial"))
	require.NoError(t, err)
	assert.Empty(t, left)
}

func TestHumanBytes(t *testing.T) {
	cases := []struct {
		in   uint64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{5 << 20, "5.0 MiB"},
		{4402341478, "4.1 GiB"},
		{3 << 40, "3.0 TiB"},
	}
	for _, tc := range cases {
		assert.Equal(t, tc.want, catalog.HumanBytes(tc.in), "%d", tc.in)
	}
}

func TestSentinelsAreDistinct(t *testing.T) {
	all := []error{catalog.ErrNotFound, catalog.ErrExists, catalog.ErrInUse, catalog.ErrInvalidRequest,
		catalog.ErrSourceNotFound, catalog.ErrDownload, catalog.ErrNoSpace, catalog.ErrChecksum, catalog.ErrNotGGUF}
	for i, a := range all {
		for j, b := range all {
			if i != j {
				assert.False(t, errors.Is(a, b), "%v is %v", a, b)
			}
		}
	}
}
