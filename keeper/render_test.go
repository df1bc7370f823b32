package keeper

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

func progress(pct float64) api.Event {
	return api.Event{Kind: "narration", Narration: &api.Narration{
		Actor: api.Actor{Component: "hive", ID: "h1"}, Action: "download",
		Fields: map[string]any{"percent": pct}, Human: "downloading",
	}}
}

func say(text string) api.Event {
	return api.Event{Kind: "narration", Narration: &api.Narration{Actor: api.Actor{Component: "worker", ID: "w1"}, Human: text}}
}

func token(i int, text string) api.Event {
	return api.Event{Kind: "token", Token: &api.Token{Index: i, Text: text}}
}

// On a terminal a download redraws one bar in place; in a pipe or a log
// each report is a plain line.
func TestDownloadProgressIsABarOnATerminalAndLinesOtherwise(t *testing.T) {
	var out, errOut bytes.Buffer
	p := &Printer{Out: &out, Err: &errOut, Terminal: true}
	p.Event(progress(25))
	p.Event(progress(50))
	p.Event(say("done"))
	require.Equal(t, "\r\033[K[hive h1] [#####...............] downloading"+
		"\r\033[K[hive h1] [##########..........] downloading\n"+
		"[worker w1] done\n", errOut.String())

	errOut.Reset()
	p = &Printer{Out: &out, Err: &errOut}
	p.Event(progress(25))
	p.Event(progress(50))
	require.Equal(t, "[hive h1] downloading\n[hive h1] downloading\n", errOut.String())
	require.Empty(t, out.String())
}

// Tokens are stdout's only content and end with one newline, whatever
// narration came between them, so `rbee infer ... > file` holds the text.
func TestTokensEndWithOneNewlineOnStdout(t *testing.T) {
	for _, terminal := range []bool{false, true} {
		var out, errOut bytes.Buffer
		p := &Printer{Out: &out, Err: &errOut, Terminal: terminal}
		p.Event(token(0, "hello"))
		p.Event(say("still going"))
		p.Event(token(1, " bee"))
		p.Event(say("finished"))
		p.Summary(api.InferResult{CompletionTokens: 2, Worker: "w1", Hive: "h1"})
		require.Equal(t, "hello bee\n", out.String())
		if terminal {
			require.Contains(t, errOut.String(), "\n[worker w1] still going\n", "a stderr line starts on a fresh line after tokens")
		} else {
			require.NotContains(t, errOut.String(), "\n\n")
		}
	}
	// With 2>&1 both streams are one: narration breaks the token line
	// once, and no blank line follows.
	var both bytes.Buffer
	p := &Printer{Out: &both, Err: &both, Shared: true}
	p.Event(token(0, "hello"))
	p.Event(say("finished"))
	p.Summary(api.InferResult{CompletionTokens: 1, Worker: "w1", Hive: "h1"})
	require.True(t, strings.HasPrefix(both.String(), "hello\n[worker w1] finished\n1 tokens"), both.String())
	both.Reset()
	p = &Printer{Out: &both, Err: &both, Shared: true}
	p.Event(token(0, "hello"))
	p.Summary(api.InferResult{CompletionTokens: 1, Worker: "w1", Hive: "h1"})
	require.True(t, strings.HasPrefix(both.String(), "hello\n1 tokens"), both.String())
	// What the worker's prompt cache spared is said where there was some.
	both.Reset()
	p = &Printer{Out: &both, Err: &both, Shared: true}
	p.Summary(api.InferResult{CompletionTokens: 3, PromptTokens: 40, CachedTokens: 38, TimeToFirstToken: api.Duration(2 * time.Millisecond), TokensPerSecond: 12, Worker: "w1", Hive: "h1", StopReason: "eos"})
	require.Equal(t, "3 tokens, first token 2ms (38 of 40 prompt tokens cached), 12.0 tokens/s, worker w1 on hive h1 (eos)\n", both.String())
	var out bytes.Buffer
	p = &Printer{Out: &out, Err: &bytes.Buffer{}, Quiet: true}
	p.Event(token(0, "x"))
	p.Done()
	require.Equal(t, "x\n", out.String())
}
