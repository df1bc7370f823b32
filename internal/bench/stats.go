package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"time"
)

// sample is a set of measurements of one quantity.
type sample []float64

func durations(ds []time.Duration) sample {
	s := make(sample, len(ds))
	for i, d := range ds {
		s[i] = float64(d) / float64(time.Millisecond)
	}
	return s
}

// pct is the nearest-rank percentile p (0-100) of s; NaN when empty.
func (s sample) pct(p float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	c := append(sample(nil), s...)
	sort.Float64s(c)
	rank := int(math.Ceil(p/100*float64(len(c)))) - 1
	rank = max(0, min(rank, len(c)-1))
	return c[rank]
}

func (s sample) p50() float64 { return s.pct(50) }
func (s sample) p99() float64 { return s.pct(99) }
func (s sample) max() float64 { return s.pct(100) }

// ms formats milliseconds with a precision that suits the magnitude.
func ms(v float64) string {
	switch {
	case math.IsNaN(v):
		return "—"
	case math.Abs(v) < 10:
		return fmt.Sprintf("%.3f ms", v)
	case math.Abs(v) < 1000:
		return fmt.Sprintf("%.1f ms", v)
	default:
		return fmt.Sprintf("%.2f s", v/1000)
	}
}

func num(v float64) string {
	switch {
	case math.IsNaN(v):
		return "—"
	case v >= 999.5:
		return thousands(int64(math.Round(v)))
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.1f", v)
	}
}

func ratio(a, b float64) string {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "—"
	}
	return fmt.Sprintf("%.3f", a/b)
}

func thousands(n int64) string {
	s := fmt.Sprintf("%d", n)
	neg := n < 0
	if neg {
		s = s[1:]
	}
	var out []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
