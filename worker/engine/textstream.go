package engine

import (
	"strings"
	"unicode/utf8"
)

// textStream turns the byte pieces of generated tokens into text to emit. It
// buffers incomplete UTF-8 characters (byte tokens split them) and holds back
// text that may be the start of a stop sequence, so that no part of a stop
// sequence is ever emitted.
type textStream struct {
	stops   []string
	pending []byte // bytes of an incomplete UTF-8 character
	held    string // valid text that may start a stop sequence
}

func newTextStream(stops []string) *textStream { return &textStream{stops: stops} }

// push adds a token's bytes. It returns the text that can be emitted now and
// whether a stop sequence was completed (text is then what came before it).
func (s *textStream) push(piece []byte) (text string, stopped bool) {
	s.pending = append(s.pending, piece...)
	var b strings.Builder
	b.WriteString(s.held)
	p := s.pending
	for len(p) > 0 {
		r, size := utf8.DecodeRune(p)
		if r == utf8.RuneError && size <= 1 {
			if !utf8.FullRune(p) {
				break // incomplete but possibly valid: wait for more bytes
			}
			b.WriteRune(utf8.RuneError) // invalid byte
			p = p[1:]
			continue
		}
		b.Write(p[:size])
		p = p[size:]
	}
	s.pending = append(s.pending[:0], p...)
	all := b.String()
	s.held = ""

	cut := -1
	for _, st := range s.stops {
		if i := strings.Index(all, st); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		s.pending = s.pending[:0]
		return all[:cut], true
	}
	hold := 0
	for _, st := range s.stops {
		if n := overlap(all, st); n > hold {
			hold = n
		}
	}
	s.held = all[len(all)-hold:]
	return all[:len(all)-hold], false
}

// flush returns everything still buffered; incomplete characters become U+FFFD.
func (s *textStream) flush() string {
	out := s.held
	if len(s.pending) > 0 {
		out += strings.ToValidUTF8(string(s.pending), string(utf8.RuneError))
	}
	s.held, s.pending = "", s.pending[:0]
	return out
}

// overlap is the length of the longest suffix of text that is a proper
// prefix of stop.
func overlap(text, stop string) int {
	n := min(len(text), len(stop)-1)
	for ; n > 0; n-- {
		if strings.HasSuffix(text, stop[:n]) {
			return n
		}
	}
	return 0
}
