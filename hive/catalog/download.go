package catalog

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Progress is one report of a running Add. Total is 0 while the size is
// unknown (a server that sends no Content-Length); Percent and ETA are then 0.
type Progress struct {
	Bytes       int64
	Total       int64
	Percent     float64
	BytesPerSec float64
	ETA         time.Duration
	// Resumed marks the report made, unthrottled, when a download picks up
	// again after a failed attempt, with Bytes where it resumes: the person
	// watching learns that the transfer dropped and that nothing is fetched
	// twice. Sentence says so.
	Resumed bool
}

// Sentence says where a download of file stands, for narration:
// "downloading tiny.gguf: 45% of 1.2 GiB at 80.0 MiB/s, 10s left", or, for a
// Resumed report, "downloading tiny.gguf: resuming at 26.3 MiB of 52.7 MiB".
func (p Progress) Sentence(file string) string {
	if p.Resumed {
		if p.Total <= 0 {
			return fmt.Sprintf("downloading %s: resuming at %s", file, HumanBytes(uint64(p.Bytes)))
		}
		return fmt.Sprintf("downloading %s: resuming at %s of %s", file, HumanBytes(uint64(p.Bytes)), HumanBytes(uint64(p.Total)))
	}
	rate := HumanBytes(uint64(p.BytesPerSec)) + "/s"
	if p.Total <= 0 {
		return fmt.Sprintf("downloading %s: %s at %s", file, HumanBytes(uint64(p.Bytes)), rate)
	}
	s := fmt.Sprintf("downloading %s: %.0f%% of %s at %s", file, p.Percent, HumanBytes(uint64(p.Total)), rate)
	if p.Bytes < p.Total {
		s += fmt.Sprintf(", %s left", p.ETA.Round(time.Second))
	}
	return s
}

// meter turns byte counts into throttled Progress callbacks. It is used by
// one goroutine only (the Add that owns it).
type meter struct {
	fn       func(Progress)
	now      func() time.Time
	interval time.Duration
	start    time.Time
	last     time.Time
	bytes    int64
	total    int64
}

func newMeter(fn func(Progress), now func() time.Time, interval time.Duration) *meter {
	t := now()
	return &meter{fn: fn, now: now, interval: interval, start: t, last: t}
}

// update records the bytes so far and reports them when the interval passed.
func (m *meter) update(bytes int64) {
	m.bytes = bytes
	if m.fn == nil {
		return
	}
	t := m.now()
	if t.Sub(m.last) < m.interval {
		return
	}
	m.last = t
	m.fn(m.snapshot(t))
}

// resumed reports, unthrottled, that a download resumes at the bytes so far.
func (m *meter) resumed() {
	if m.fn == nil {
		return
	}
	p := m.snapshot(m.now())
	p.Resumed = true
	m.fn(p)
}

// finish reports the end unconditionally, so a watcher always sees 100%.
func (m *meter) finish() {
	if m.fn == nil {
		return
	}
	if m.total <= 0 {
		m.total = m.bytes
	}
	m.fn(m.snapshot(m.now()))
}

func (m *meter) snapshot(t time.Time) Progress {
	p := Progress{Bytes: m.bytes, Total: max(m.total, 0)}
	if el := t.Sub(m.start).Seconds(); el > 0 {
		p.BytesPerSec = float64(m.bytes) / el
	}
	if p.Total > 0 {
		p.Percent = min(100, 100*float64(p.Bytes)/float64(p.Total))
		if p.BytesPerSec > 0 && p.Bytes < p.Total {
			p.ETA = time.Duration(float64(p.Total-p.Bytes) / p.BytesPerSec * float64(time.Second))
		}
	}
	return p
}

// sink is where the bytes of one Add go: the partial file and the running
// hash, kept in step so that a resume can continue both.
type sink struct {
	f     *os.File
	h     hash.Hash
	n     int64
	meter *meter
}

func (s *sink) Write(p []byte) (int, error) {
	n, err := s.f.Write(p)
	s.h.Write(p[:n])
	s.n += int64(n)
	s.meter.update(s.n)
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return n, fmt.Errorf("catalog: %w: the disk filled up while writing %s; free some space and add the model again", ErrNoSpace, s.f.Name())
		}
		return n, fmt.Errorf("catalog: writing %s: %w", s.f.Name(), err)
	}
	return n, nil
}

// reset starts the file and the hash over, for a server that cannot resume.
func (s *sink) reset() error {
	if err := s.f.Truncate(0); err != nil {
		return fmt.Errorf("catalog: restarting download: %w", err)
	}
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("catalog: restarting download: %w", err)
	}
	s.h.Reset()
	s.n = 0
	s.meter.update(0)
	return nil
}

// checkSpace refuses to start writing need more bytes than the disk has free.
// A probe that fails skips the check: the write itself still reports ENOSPC.
func (c *Catalog) checkSpace(need int64) error {
	if need <= 0 {
		return nil
	}
	where := c.partialPath()
	free, err := c.opts.freeDisk(where)
	if err != nil || free >= uint64(need) {
		return nil
	}
	return fmt.Errorf("catalog: %w: the model needs %s, %s free on %s; free some space or choose a smaller model",
		ErrNoSpace, HumanBytes(uint64(need)), HumanBytes(free), where)
}

// copyFile copies a local model into the sink, with progress and ctx checks
// between chunks (a large copy must stop promptly too).
func (c *Catalog) copyFile(ctx context.Context, src string, s *sink) error {
	f, err := os.Open(src)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("catalog: %w: %s does not exist; check the path", ErrSourceNotFound, src)
	}
	if err != nil {
		return fmt.Errorf("catalog: opening %s: %w", src, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("catalog: reading %s: %w", src, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("catalog: %w: field \"source\": %s is not a regular file", ErrInvalidRequest, src)
	}
	s.meter.total = st.Size()
	if err := c.checkSpace(st.Size()); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		n, rerr := f.Read(buf)
		if n > 0 {
			if _, err := s.Write(buf[:n]); err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return fmt.Errorf("catalog: reading %s: %w", src, rerr)
		}
	}
}

// errStalled cancels an attempt that received nothing for stallTimeout.
var errStalled = errors.New("no data received")

// attemptResult says how one HTTP attempt ended: done, retry (after a
// transient failure, possibly with bytes gained), or a final error.
type attemptResult struct {
	done   bool
	err    error // final when retry is false
	retry  bool
	gained bool
}

// download fetches u into s, resuming with Range requests after transient
// failures. The hash continues across resumes because s holds it; a server
// that does not honour the Range restarts the file from byte 0.
func (c *Catalog) download(ctx context.Context, u *url.URL, s *sink) error {
	failures := 0
	var lastErr error
	for {
		if failures > 0 {
			if failures > c.opts.retries {
				return fmt.Errorf("catalog: %w: gave up on %s after %d failed attempts; the last: %w", ErrDownload, u.Redacted(), failures, lastErr)
			}
			wait := min(c.opts.backoff<<(failures-1), 2*time.Second)
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return context.Cause(ctx)
			case <-t.C:
			}
		}
		r := c.attempt(ctx, u, s)
		switch {
		case r.done:
			return nil
		case !r.retry:
			return r.err
		}
		lastErr = r.err
		if r.gained {
			failures = 1 // progress was made: the connection is flaky, not dead
		} else {
			failures++
		}
	}
}

// attempt is one GET, from byte s.n on.
func (c *Catalog) attempt(ctx context.Context, u *url.URL, s *sink) attemptResult {
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	req, err := http.NewRequestWithContext(actx, http.MethodGet, u.String(), nil)
	if err != nil {
		return attemptResult{err: fmt.Errorf("catalog: %w: field \"source\" %s: %v", ErrInvalidRequest, u.Redacted(), err)}
	}
	// identity: a transparently gunzipped body has no length, and byte
	// ranges of it would not line up with the file.
	req.Header.Set("Accept-Encoding", "identity")
	req.Header.Set("User-Agent", "rbee-hive")
	resuming := s.n > 0
	if resuming {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", s.n))
	}
	// The stall watchdog covers the wait for headers and every read.
	stall := time.AfterFunc(c.opts.stallTimeout, func() { cancel(errStalled) })
	defer stall.Stop()

	resp, err := c.opts.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return attemptResult{err: context.Cause(ctx)}
		}
		if cause := context.Cause(actx); errors.Is(cause, errStalled) {
			err = cause
		}
		// A transport error names the URL already (*url.Error).
		return attemptResult{retry: true, err: err}
	}
	defer resp.Body.Close()

	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return attemptResult{err: fmt.Errorf("catalog: %w: %s answered %s; check the URL (for hf: the org, repo, file name and revision)", ErrSourceNotFound, u.Redacted(), resp.Status)}
	case resp.StatusCode == http.StatusPartialContent && resuming:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != s.n || (s.meter.total > 0 && total >= 0 && total != s.meter.total) {
			// The server sent another range than asked (or changed the file);
			// appending it would corrupt the model, so start over.
			if err := s.reset(); err != nil {
				return attemptResult{err: err}
			}
			return attemptResult{retry: true, err: fmt.Errorf("%s answered a resume from byte %d with Content-Range %q; restarting from 0", u.Redacted(), start, resp.Header.Get("Content-Range"))}
		}
		if total >= 0 {
			s.meter.total = total
		}
		s.meter.resumed()
	case resp.StatusCode == http.StatusOK:
		if resuming {
			// The server ignored the Range header: the body is the whole file.
			if err := s.reset(); err != nil {
				return attemptResult{err: err}
			}
		}
		if resp.ContentLength >= 0 {
			s.meter.total = resp.ContentLength
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && resuming && s.meter.total == s.n:
		return attemptResult{done: true} // everything had arrived before the drop
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout:
		return attemptResult{retry: true, err: fmt.Errorf("%s answered %s", u.Redacted(), resp.Status)}
	default:
		hint := ""
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			hint = "; the model may be gated or private, which this hive cannot download"
		}
		return attemptResult{err: fmt.Errorf("catalog: %w: %s answered %s%s", ErrDownload, u.Redacted(), resp.Status, hint)}
	}

	if s.meter.total > 0 {
		if err := c.checkSpace(s.meter.total - s.n); err != nil {
			return attemptResult{err: err}
		}
	}

	before := s.n
	buf := make([]byte, 256<<10)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			stall.Reset(c.opts.stallTimeout)
			if _, err := s.Write(buf[:n]); err != nil {
				return attemptResult{err: err}
			}
		}
		if rerr == nil {
			continue
		}
		gained := s.n > before
		if rerr == io.EOF {
			if s.meter.total > 0 && s.n < s.meter.total {
				return attemptResult{retry: true, gained: gained, err: fmt.Errorf("%s: body ended at byte %d of %d", u.Redacted(), s.n, s.meter.total)}
			}
			return attemptResult{done: true}
		}
		if ctx.Err() != nil {
			return attemptResult{err: context.Cause(ctx)}
		}
		if cause := context.Cause(actx); errors.Is(cause, errStalled) {
			rerr = fmt.Errorf("%w for %s", cause, c.opts.stallTimeout)
		}
		// Unexpected EOF, reset, stall: resume from s.n.
		return attemptResult{retry: true, gained: gained, err: fmt.Errorf("%s: at byte %d: %w", u.Redacted(), s.n, rerr)}
	}
}

// parseContentRange reads "bytes START-END/TOTAL"; total is -1 for "*".
func parseContentRange(v string) (start, total int64, ok bool) {
	rest, found := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, size, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	first, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(first, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	if size == "*" {
		return start, -1, true
	}
	total, err = strconv.ParseInt(size, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	return start, total, true
}
