package hive_test

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

var (
	tinyOnce  sync.Once
	tinyBytes []byte
)

// tiny is the synthetic tiny model's file content.
func tiny(t *testing.T) []byte {
	t.Helper()
	tinyOnce.Do(func() {
		var buf bytes.Buffer
		require.NoError(t, gguf.Synth(&buf, gguf.Tiny()))
		tinyBytes = buf.Bytes()
	})
	return tinyBytes
}

func TestModelCatalogEndpoints(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "cat")
	startHive(t, fix, "cat", nil)
	b := fix.Bus

	var list api.ModelListReply
	mustCall(t, b, "cat", api.HiveEpModelList, nil, &list)
	require.Equal(t, "cat", list.Hive)
	require.Empty(t, list.Models)

	var m api.Model
	mustCall(t, b, "cat", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny-1.0"}, &m)
	require.Equal(t, "tiny-1.0", m.ID)
	require.Equal(t, "synth:tiny", m.Source)
	require.Equal(t, "llama", m.Architecture)
	require.Positive(t, m.EstimatedMemory)
	require.NotEqual(t, "tiny-1.0", m.Key, "a dotted id gets a derived key")

	// The heartbeat carries the catalog summary at once.
	e := awaitEntry(t, entries, 2*time.Second, "a beat listing the model", func(e jetstream.KeyValueEntry) bool {
		return isPut(e) && len(hiveStatusOf(t, e).Models) == 1
	})
	require.Equal(t, api.ModelBrief{ID: m.ID, Key: m.Key, EstimatedMemory: m.EstimatedMemory}, hiveStatusOf(t, e).Models[0])

	var got api.Model
	mustCall(t, b, "cat", api.HiveEpModelGet, api.ModelRequest{Model: "tiny-1.0"}, &got)
	require.Equal(t, "synth:tiny", got.Source, "the synth source is what the catalog records")
	require.Equal(t, m.SHA256, got.SHA256)
	mustCall(t, b, "cat", api.HiveEpModelList, nil, &list)
	require.Len(t, list.Models, 1)

	err := call(t, b, "cat", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny-1.0"}, nil, time.Minute)
	requireCode(t, err, api.CodeConflict, "already")
	err = call(t, b, "cat", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "x", Size: "huge"}, nil, time.Minute)
	requireCode(t, err, api.CodeBadRequest, "huge")
	err = call(t, b, "cat", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "../etc"}, nil, time.Minute)
	requireCode(t, err, api.CodeBadRequest)
	err = call(t, b, "cat", api.HiveEpModelGet, api.ModelRequest{Model: "nope"}, nil, time.Minute)
	requireCode(t, err, api.CodeNotFound, "model nope is not in hive cat's catalog")
	err = call(t, b, "cat", api.HiveEpModelGet, []byte("not json"), nil, time.Minute)
	requireCode(t, err, api.CodeBadRequest)

	mustCall(t, b, "cat", api.HiveEpModelDelete, api.ModelRequest{Model: "tiny-1.0"}, nil)
	err = call(t, b, "cat", api.HiveEpModelDelete, api.ModelRequest{Model: "tiny-1.0"}, nil, time.Minute)
	requireCode(t, err, api.CodeNotFound)
	mustCall(t, b, "cat", api.HiveEpModelList, nil, &list)
	require.Empty(t, list.Models)
	awaitEntry(t, entries, 2*time.Second, "a beat without the model", func(e jetstream.KeyValueEntry) bool {
		return isPut(e) && len(hiveStatusOf(t, e).Models) == 0
	})
}

// slowServer serves data in chunks paced so a download takes about d, long
// enough for progress reports between start and end.
func slowServer(t *testing.T, data []byte, chunks int, d time.Duration) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/missing.gguf" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		step := (len(data) + chunks - 1) / chunks
		tick := time.NewTicker(d / time.Duration(chunks))
		defer tick.Stop()
		for off := 0; off < len(data); off += step {
			end := min(off+step, len(data))
			if _, err := w.Write(data[off:end]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			if r.URL.Path == "/stall.gguf" {
				<-r.Context().Done() // never more than the first chunk
				return
			}
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestModelAddNarratesProgress(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	srv := slowServer(t, tiny(t), 12, 1500*time.Millisecond)
	startHive(t, fix, "dl", nil)

	var m api.Model
	mustCall(t, fix.Bus, "dl", api.HiveEpModelAdd, api.ModelAddArgs{Hive: "dl", Source: srv.URL + "/tiny.gguf", JobID: "dl-job"}, &m)
	require.Equal(t, "tiny", m.ID)
	require.Equal(t, int64(len(tiny(t))), m.Size)

	n.await(t, time.Second, "the added sentence", func(ev api.Narration) bool { return ev.JobID == "dl-job" && ev.Action == "added" })
	n.mu.Lock()
	var progress []api.Narration
	for _, ev := range n.events {
		if ev.JobID == "dl-job" && ev.Action == "download" && ev.Fields != nil {
			progress = append(progress, ev)
		}
	}
	n.mu.Unlock()
	require.GreaterOrEqual(t, len(progress), 2, "progress during the download and at its end")
	sentence := regexp.MustCompile(`^downloading tiny\.gguf: \d+% of \d+\.\d (B|KiB|MiB) at \d+(\.\d)? (B|KiB|MiB)/s(, \d+s left)?$`)
	for i, ev := range progress {
		t.Logf("progress: %s", ev.Human)
		require.Regexp(t, sentence, ev.Human)
		for _, k := range []string{"bytes", "total", "percent", "rate", "eta"} {
			require.Contains(t, ev.Fields, k)
		}
		require.EqualValues(t, len(tiny(t)), ev.Fields["total"])
		if i > 0 && i < len(progress)-1 { // the final report comes whenever the download ends
			require.GreaterOrEqual(t, ev.Time.Sub(progress[i-1].Time), 400*time.Millisecond, "at most every 500ms")
		}
	}
	last := progress[len(progress)-1]
	require.EqualValues(t, 100, last.Fields["percent"])
	require.Contains(t, last.Human, "100% of")

	// Catalog errors map to codes.
	for _, tc := range []struct {
		name string
		args api.ModelAddArgs
		code int
		want string
	}{
		{"exists", api.ModelAddArgs{Source: srv.URL + "/tiny.gguf"}, api.CodeConflict, "tiny"},
		{"missing", api.ModelAddArgs{Source: srv.URL + "/missing.gguf"}, api.CodeNotFound, ""},
		{"bad scheme", api.ModelAddArgs{Source: "ftp://x/y.gguf"}, api.CodeBadRequest, ""},
		{"no source", api.ModelAddArgs{}, api.CodeBadRequest, "source"},
		{"bad checksum", api.ModelAddArgs{Source: srv.URL + "/tiny.gguf", Name: "t2", SHA256: "xyz"}, api.CodeBadRequest, "sha256"},
		{"wrong checksum", api.ModelAddArgs{Source: srv.URL + "/tiny.gguf", Name: "t3", SHA256: "0000000000000000000000000000000000000000000000000000000000000000"}, api.CodeBadRequest, "checksum"},
		{"other hive", api.ModelAddArgs{Hive: "elsewhere", Source: srv.URL + "/tiny.gguf"}, api.CodeBadRequest, "not elsewhere"},
		{"bad job id", api.ModelAddArgs{Source: srv.URL + "/tiny.gguf", Name: "t4", JobID: "a.>"}, api.CodeBadRequest, "job id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := call(t, fix.Bus, "dl", api.HiveEpModelAdd, tc.args, nil, time.Minute)
			requireCode(t, err, tc.code, tc.want)
		})
	}
}

func TestModelAddIsCancelledByItsJob(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	srv := slowServer(t, tiny(t), 4, time.Second)
	startHive(t, fix, "cx", nil)

	errc := make(chan error, 1)
	go func() {
		errc <- call(t, fix.Bus, "cx", api.HiveEpModelAdd, api.ModelAddArgs{Source: srv.URL + "/stall.gguf", JobID: "cx-job"}, nil, time.Minute)
	}()
	// The first narration comes after the hive listens for the cancel.
	n.await(t, 5*time.Second, "download start", func(ev api.Narration) bool { return ev.JobID == "cx-job" })
	cancelSubject, err := fix.Bus.Space.JobCancel("cx-job")
	require.NoError(t, err)
	require.NoError(t, fix.Bus.NC.Publish(cancelSubject, nil))
	sent := time.Now()
	select {
	case err := <-errc:
		requireCode(t, err, hive.CodeCancelled, "job cancelled")
		t.Logf("download stopped %s after the cancel", time.Since(sent).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("the cancel did not stop the download")
	}
	var list api.ModelListReply
	mustCall(t, fix.Bus, "cx", api.HiveEpModelList, nil, &list)
	require.Empty(t, list.Models, "nothing of a cancelled download is left")
}
