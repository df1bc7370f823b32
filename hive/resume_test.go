package hive_test

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestModelAddNarratesResume checks that a download whose connection drops
// tells the person following the job that it resumes, and where.
func TestModelAddNarratesResume(t *testing.T) {
	t.Parallel()
	data := tiny(t)
	cut := len(data) / 2
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hits.Add(1) > 1 {
			http.ServeContent(w, r, "tiny.gguf", time.Time{}, bytes.NewReader(data))
			return
		}
		// The first attempt gets half the file, then its connection dies.
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		_, _ = w.Write(data[:cut])
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if !assert.NoError(t, err) {
			return
		}
		conn.Close()
	}))
	t.Cleanup(srv.Close)
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	startHive(t, fix, "rs", nil)

	var m api.Model
	mustCall(t, fix.Bus, "rs", api.HiveEpModelAdd, api.ModelAddArgs{Hive: "rs", Source: srv.URL + "/tiny.gguf", JobID: "rs-job"}, &m)
	require.Equal(t, int64(len(data)), m.Size)

	ev := n.await(t, 5*time.Second, "the resume", func(ev api.Narration) bool {
		return ev.JobID == "rs-job" && ev.Action == "download" && ev.Fields["resumed"] == true
	})
	require.Equal(t, "downloading tiny.gguf: resuming at "+catalog.HumanBytes(uint64(cut))+" of "+catalog.HumanBytes(uint64(len(data))), ev.Human)
	require.GreaterOrEqual(t, hits.Load(), int32(2))
}
