package engine

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// feed pushes pieces and returns what was emitted (plus the final flush when
// no stop sequence matched).
func feed(stops []string, pieces ...string) (emitted []string, out string, stopped bool) {
	s := newTextStream(stops)
	var b strings.Builder
	for _, p := range pieces {
		text, st := s.push([]byte(p))
		emitted = append(emitted, text)
		b.WriteString(text)
		if st {
			return emitted, b.String(), true
		}
	}
	b.WriteString(s.flush())
	return emitted, b.String(), false
}

func TestTextStreamUTF8AcrossTokens(t *testing.T) {
	// "é" is C3 A9, "🐝" is F0 9F 90 9D: split across byte tokens.
	em, out, _ := feed(nil, "a", "\xc3", "\xa9", "\xf0", "\x9f\x90", "\x9d", "!")
	assert.Equal(t, []string{"a", "", "é", "", "", "🐝", "!"}, em)
	assert.Equal(t, "aé🐝!", out)
}

func TestTextStreamInvalidBytes(t *testing.T) {
	em, out, _ := feed(nil, "\xff", "x", "\xc3")
	assert.Equal(t, []string{"\uFFFD", "x", ""}, em)
	assert.Equal(t, "\uFFFDx\uFFFD", out, "incomplete rune at the end is flushed as U+FFFD")
	// A lead byte followed by a non-continuation byte.
	_, out, _ = feed(nil, "\xe2", "a")
	assert.Equal(t, "\uFFFDa", out)
}

func TestTextStreamStopAcrossTokens(t *testing.T) {
	em, out, stopped := feed([]string{"END"}, "hello ", "E", "N", "D", "more")
	assert.True(t, stopped)
	assert.Equal(t, "hello ", out)
	assert.Equal(t, []string{"hello ", "", "", ""}, em, "no part of the stop sequence is emitted")
}

func TestTextStreamFalseStart(t *testing.T) {
	em, out, stopped := feed([]string{"END"}, "a", "E", "N", "x", "EEN", "D")
	assert.True(t, stopped)
	assert.Equal(t, "aENxE", out)
	assert.Equal(t, []string{"a", "", "", "ENx", "E", ""}, em)
}

func TestTextStreamStopInsideToken(t *testing.T) {
	_, out, stopped := feed([]string{"\n\n", "###"}, "one", " two\n\nthree")
	assert.True(t, stopped)
	assert.Equal(t, "one two", out)
	// The earliest of several stop sequences wins.
	_, out, _ = feed([]string{"b", "a"}, "xxab")
	assert.Equal(t, "xx", out)
}

func TestTextStreamHeldTextFlushed(t *testing.T) {
	em, out, stopped := feed([]string{"END"}, "x", "EN")
	assert.False(t, stopped)
	assert.Equal(t, []string{"x", ""}, em)
	assert.Equal(t, "xEN", out)
}

func TestTextStreamStopWithMultibyte(t *testing.T) {
	_, out, stopped := feed([]string{"é!"}, "caf", "\xc3", "\xa9", "!", "x")
	assert.True(t, stopped)
	assert.Equal(t, "caf", out)
}

func TestOverlap(t *testing.T) {
	assert.Equal(t, 0, overlap("abc", "xyz"))
	assert.Equal(t, 2, overlap("abXY", "XYZ"))
	assert.Equal(t, 0, overlap("XYZ", "XYZ"), "a full match is not an overlap")
	assert.Equal(t, 1, overlap("a", "ab"))
}
