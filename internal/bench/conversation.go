package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/worker/engine"
)

// A conversation: what a chat client sends. Every turn resends the whole
// conversation so far with one more message, so a turn's prompt grows by
// the last reply and the new message; an engine that keeps a slot's cache
// decodes only those, one that does not decodes the whole history again.
// Table 1's rounds send one short prompt and cannot show the difference.

const (
	convTurns     = 8
	convReply     = 32  // tokens a reply
	convUserBytes = 160 // a user message, at least
)

// convWay is one way of table 1 asked for a completion of prompt: its
// time to the first token and the text.
type convWay struct {
	name string
	gen  func(ctx context.Context, prompt string, n int) (time.Duration, string, error)
}

// engineConvWay is A: the engine in-process.
func engineConvWay(name string, m engine.Model) convWay {
	return convWay{name: name, gen: func(ctx context.Context, prompt string, n int) (time.Duration, string, error) {
		slot, err := m.NewSlot()
		if err != nil {
			return 0, "", err
		}
		defer slot.Close()
		var b strings.Builder
		res, err := slot.Generate(ctx, engine.Request{Prompt: prompt, MaxTokens: n, Seed: overheadSeed}, func(t engine.Token) error {
			b.WriteString(t.Text)
			return nil
		})
		return res.TimeToFirstToken, b.String(), err
	}}
}

// sseConvWay is a completions endpoint at base (rbee's gateway, or
// Ollama's), read as C reads it.
func sseConvWay(name, base, model string) convWay {
	return convWay{name: name, gen: func(ctx context.Context, prompt string, n int) (time.Duration, string, error) {
		t0, arrivals, text, err := streamCompletion(ctx, base, map[string]any{"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "seed": overheadSeed})
		if err != nil {
			return 0, "", err
		}
		if len(arrivals) == 0 {
			return 0, "", errors.New("no token")
		}
		return arrivals[0].Sub(t0), text, nil
	}}
}

// userMessage is the k-th message of conversation r: words of the short
// prompts, at least convUserBytes long (about 80 tokens in the test
// models' tokenizer).
func userMessage(r, k int) string {
	var b strings.Builder
	b.WriteString("user: ")
	for i := 0; b.Len() < convUserBytes; i++ {
		b.WriteString(concPrompts[(r*3+k*5+i)%len(concPrompts)])
		b.WriteString(", ")
	}
	b.WriteString("\nassistant:")
	return b.String()
}

// benchConversation runs, for every way, conversations of convTurns turns
// (continued: each turn's prompt the whole conversation so far) and, for
// every turn, the same prompt opened otherwise, as a conversation seen for
// the first time, so that no cache holds it. Rounds are interleaved by
// way, a conversation of its own each round.
func benchConversation(ctx context.Context, e *env, model string, ways []convWay, rounds int) (*Table, error) {
	t := &Table{
		Intro: fmt.Sprintf("**A conversation**, %s model: %d turns, each a user message of about %d bytes and a greedy reply of %d tokens, every turn's prompt the whole conversation so far (what a chat client sends); "+
			"**continued** sends the turns one after the other, **new** sends each turn's prompt with another first line, as a conversation never seen, so that no prompt cache holds it. "+
			"TTFT p50 over %d rounds (a conversation of its own each round, after a warm-up round), ways as above.",
			model, convTurns, convUserBytes, convReply, rounds),
		Header: []string{"way", "turn 1", "turn 2", "turn 4", "turn 8", "turn 8 prompt (bytes)"},
	}
	type key struct {
		way string
		new bool
	}
	ttfts := map[key][convTurns]sample{}
	lastLen := map[string]int{}
	var errs []error
	for r := -1; r < rounds && ctx.Err() == nil; r++ {
		for i := range ways {
			w := ways[(i+max(r, 0))%len(ways)]
			// The turns first, then the same prompts as new
			// conversations: a way of one slot (A, Ollama here) keeps
			// one conversation in its cache.
			conv := ""
			var prompts [convTurns]string
			var cont, fresh [convTurns]time.Duration
			var err error
			for k := 0; k < convTurns && err == nil; k++ {
				conv += userMessage(r+1, k)
				prompts[k] = conv
				var reply string
				cont[k], reply, err = w.gen(ctx, conv, convReply)
				conv += reply + "\n"
			}
			for k := 0; k < convTurns && err == nil; k++ {
				// The same prompt, opened otherwise: nothing holds it.
				fresh[k], _, err = w.gen(ctx, fmt.Sprintf("%d %d %s\n", r+1, k, w.name[:1])+prompts[k], convReply)
			}
			lastLen[w.name] = len(prompts[convTurns-1])
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", w.name, err))
				continue
			}
			if r < 0 {
				continue
			}
			for _, nw := range []bool{false, true} {
				s := ttfts[key{w.name, nw}]
				for k := range convTurns {
					d := cont[k]
					if nw {
						d = fresh[k]
					}
					s[k] = append(s[k], float64(d)/float64(time.Millisecond))
				}
				ttfts[key{w.name, nw}] = s
			}
		}
	}
	for _, w := range ways {
		for _, nw := range []bool{false, true} {
			s, ok := ttfts[key{w.name, nw}]
			label := w.name + ", continued"
			if nw {
				label = w.name + ", new"
			}
			if !ok || len(s[0]) == 0 {
				t.Rows = append(t.Rows, []string{label, "not measured"})
				continue
			}
			t.Rows = append(t.Rows, []string{label, ms(s[0].p50()), ms(s[1].p50()), ms(s[3].p50()), ms(s[7].p50()), fmt.Sprint(lastLen[w.name])})
		}
	}
	e.logf("overhead: conversation done")
	return t, errors.Join(errs...)
}
