package keeper

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/urfave/cli/v2"
)

// Printer shows events the way the user asked: readable narration on
// stderr and results on stdout, NDJSON on stdout (--json), or tokens only
// (-q). Keeping results on stdout lets output be piped.
type Printer struct {
	Out, Err io.Writer
	JSON     bool
	Quiet    bool
	// progress remembers that the last stderr line was a progress line
	// redrawn in place, on a terminal.
	Terminal bool
	// Shared means stdout and stderr reach one place, so a narration line
	// after tokens must first end their line.
	Shared   bool
	progress bool
	// outOpen notes that stdout holds tokens with no closing newline yet:
	// the output ends with one so pipes and shells get a whole line.
	outOpen bool
	// glue notes that tokens were printed since the last stderr line, so
	// the next stderr line must start on a fresh line of a shared terminal.
	glue bool
}

// Event prints one job event.
func (p *Printer) Event(ev api.Event) {
	if p.JSON {
		p.jsonLine(ev)
		return
	}
	switch {
	case ev.Token != nil:
		p.endProgress()
		fmt.Fprint(p.Out, ev.Token.Text)
		p.outOpen, p.glue = true, true
	case ev.Narration != nil:
		if !p.Quiet {
			p.Narration(*ev.Narration)
		}
	case ev.State != nil:
		if !p.Quiet && !ev.State.State.Terminal() && ev.State.State != api.JobQueued {
			p.line(fmt.Sprintf("[%s] job is %s", actorLabel(ev.State.Actor), ev.State.State))
		}
	}
}

func (p *Printer) jsonLine(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		return
	}
	fmt.Fprintln(p.Out, string(b))
}

// JSONValue prints any result as one JSON line.
func (p *Printer) JSONValue(v any) { p.jsonLine(v) }

func actorLabel(a api.Actor) string {
	if a.ID == "" {
		return a.Component
	}
	return a.Component + " " + a.ID
}

// Narration prints one narration line to stderr.
func (p *Printer) Narration(n api.Narration) {
	label := n.Actor.Component
	switch {
	case n.Actor.ID != "":
		label += " " + n.Actor.ID
	case n.Actor.Component == "hive" && n.HiveID != "":
		label += " " + n.HiveID
	}
	text := n.Human
	if n.Level == "warn" || n.Level == "error" {
		text = n.Level + ": " + text
	}
	if isProgress(n) && p.Terminal {
		p.progressLine(fmt.Sprintf("[%s] %s %s", label, bar(n.Fields), text))
		return
	}
	p.line(fmt.Sprintf("[%s] %s", label, text))
}

func isProgress(n api.Narration) bool {
	_, ok := n.Fields["percent"]
	return ok && n.Action == "download"
}

// bar draws a 20-cell progress bar from a narration's percent field.
func bar(fields map[string]any) string {
	pct, _ := fields["percent"].(float64)
	filled := int(pct / 5)
	if filled > 20 {
		filled = 20
	}
	return "[" + strings.Repeat("#", filled) + strings.Repeat(".", 20-filled) + "]"
}

func (p *Printer) progressLine(s string) {
	fmt.Fprintf(p.Err, "\r\033[K%s", s)
	p.progress = true
}

func (p *Printer) endProgress() {
	if p.progress {
		fmt.Fprintln(p.Err)
		p.progress = false
	}
}

func (p *Printer) line(s string) {
	p.endProgress()
	if p.glue && (p.Terminal || p.Shared) {
		// Tokens went to stdout without a newline; keep stderr lines
		// from gluing onto them on a shared terminal.
		fmt.Fprintln(p.Err)
	}
	p.glue = false
	fmt.Fprintln(p.Err, s)
}

// Message prints a plain line on stderr, unless quiet.
func (p *Printer) Message(format string, args ...any) {
	if p.Quiet || p.JSON {
		return
	}
	p.line(fmt.Sprintf(format, args...))
}

// Summary prints the closing line of an inference.
func (p *Printer) Summary(r api.InferResult) {
	p.closeOut()
	if p.Quiet || p.JSON {
		return
	}
	p.endProgress()
	cached := ""
	if r.CachedTokens > 0 {
		cached = fmt.Sprintf(" (%d of %d prompt tokens cached)", r.CachedTokens, r.PromptTokens)
	}
	fmt.Fprintf(p.Err, "%d tokens, first token %s%s, %.1f tokens/s, worker %s on hive %s (%s)\n",
		r.CompletionTokens, time.Duration(r.TimeToFirstToken).Round(time.Microsecond*100), cached, r.TokensPerSecond, r.Worker, r.Hive, r.StopReason)
}

// Done finishes any pending line.
func (p *Printer) Done() {
	p.endProgress()
	p.closeOut()
}

// closeOut ends the token line on stdout, unless stdout is shared with
// stderr and a narration line has ended it already.
func (p *Printer) closeOut() {
	if p.outOpen && !p.JSON && (p.glue || !p.Shared) {
		fmt.Fprintln(p.Out)
	}
	p.outOpen, p.glue = false, false
}

// listing prints items as NDJSON with --json, else as a table under header
// (tab-separated columns) with one row per item.
func listing[T any](c *cli.Context, items []T, header string, row func(T) string) error {
	if c.Bool("json") {
		p := printer(c)
		for _, it := range items {
			p.JSONValue(it)
		}
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 2, 2, ' ', 0)
	fmt.Fprintln(w, header)
	for _, it := range items {
		fmt.Fprintln(w, row(it))
	}
	return w.Flush()
}
