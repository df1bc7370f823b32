package catalog_test

import (
	"bytes"
	"context"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/hive/catalog"
)

// dropOnce serves data with Range support, except that the first request
// gets only the first cut bytes before its connection is closed.
func dropOnce(t *testing.T, data []byte, cut int) (url string, ranges func() []string) {
	var mu sync.Mutex
	var seen []string
	srv := serve(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Range"))
		n := len(seen)
		mu.Unlock()
		if n > 1 {
			http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(data))
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data[:cut])
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if !assert.NoError(t, err) {
			return
		}
		conn.Close()
	})
	return srv.URL, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

// TestAddReportsResume checks that a download that drops and resumes says
// so at once, with where it resumes, and that only that report is marked.
func TestAddReportsResume(t *testing.T) {
	data := tiny(t)
	url, ranges := dropOnce(t, data, len(data)/2)
	c := open(t, catalog.WithRetries(5, time.Millisecond), catalog.WithProgressInterval(time.Hour))

	var events []catalog.Progress
	_, err := c.Add(context.Background(), catalog.AddRequest{Source: url + "/tiny.gguf", SHA256: sha(data)}, func(p catalog.Progress) {
		events = append(events, p)
	})
	require.NoError(t, err)

	var resumed []catalog.Progress
	for _, p := range events {
		if p.Resumed {
			resumed = append(resumed, p)
		}
	}
	require.Len(t, resumed, 1, "one resume, one report (the interval throttles everything else): %+v", events)
	r := resumed[0]
	seen := ranges()
	require.Len(t, seen, 2)
	assert.Equal(t, "bytes="+strconv.FormatInt(r.Bytes, 10)+"-", seen[1], "the report names the byte the download resumed at")
	assert.Greater(t, r.Bytes, int64(0))
	assert.Equal(t, int64(len(data)), r.Total)
	assert.Equal(t, "downloading tiny.gguf: resuming at "+catalog.HumanBytes(uint64(r.Bytes))+" of "+catalog.HumanBytes(uint64(len(data))),
		r.Sentence("tiny.gguf"))
	assert.False(t, events[len(events)-1].Resumed, "the final report is an ordinary one")
}

func TestProgressSentence(t *testing.T) {
	for _, tc := range []struct {
		p    catalog.Progress
		want string
	}{
		{catalog.Progress{Bytes: 27577548, Total: 55259955, Resumed: true}, "downloading m.gguf: resuming at 26.3 MiB of 52.7 MiB"},
		{catalog.Progress{Bytes: 27577548, Resumed: true}, "downloading m.gguf: resuming at 26.3 MiB"},
		{catalog.Progress{Bytes: 512, Total: 1024, Percent: 50, BytesPerSec: 2048, ETA: 1400 * time.Millisecond}, "downloading m.gguf: 50% of 1.0 KiB at 2.0 KiB/s, 1s left"},
		{catalog.Progress{Bytes: 1024, Total: 1024, Percent: 100, BytesPerSec: 2048}, "downloading m.gguf: 100% of 1.0 KiB at 2.0 KiB/s"},
		{catalog.Progress{Bytes: 2048, BytesPerSec: 1024}, "downloading m.gguf: 2.0 KiB at 1.0 KiB/s"},
	} {
		assert.Equal(t, tc.want, tc.p.Sentence("m.gguf"))
	}
}
