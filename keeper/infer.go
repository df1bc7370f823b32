package keeper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// errTimedOut is the cause of a context that a command's own deadline
// (--timeout) ended; follow reports it instead of an interruption.
var errTimedOut = errors.New("timed out")

func inferCommand() *cli.Command {
	return &cli.Command{
		Name:      "infer",
		Usage:     "run a prompt on the best worker for the model and stream the tokens",
		ArgsUsage: "PROMPT (or on stdin)",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "model", Aliases: []string{"m"}, Usage: "model id", Value: "tiny", EnvVars: []string{"RBEE_MODEL"}},
			&cli.StringFlag{Name: "hive", Usage: "run on this hive only"},
			&cli.StringFlag{Name: "device", Usage: "run on this device only: cpu or cuda:N"},
			&cli.IntFlag{Name: "max-tokens", Usage: "stop after this many tokens", Value: 128},
			&cli.Float64Flag{Name: "temperature", Usage: "0 is greedy", Value: 0.7},
			&cli.Float64Flag{Name: "top-p", Usage: "nucleus sampling (0 = off)"},
			&cli.IntFlag{Name: "top-k", Usage: "top-k sampling (0 = off)"},
			&cli.Float64Flag{Name: "min-p", Usage: "min-p sampling (0 = off)"},
			&cli.Float64Flag{Name: "repeat-penalty", Usage: "repeat penalty (0 = off)"},
			&cli.Int64Flag{Name: "seed", Usage: "random seed (-1 = random)", Value: -1},
			&cli.StringSliceFlag{Name: "stop", Usage: "stop sequence (repeatable)"},
			&cli.StringFlag{Name: "system", Usage: "system prompt (uses the model's chat template)"},
			&cli.DurationFlag{Name: "timeout", Usage: "cancel the job if it takes longer (0 = the queen's job timeout)"},
			&cli.BoolFlag{Name: "detach", Usage: "print the job id and return; follow with 'rbee jobs attach ID'"},
			&cli.BoolFlag{Name: "pull", Usage: "download the model when no hive has it (-m takes a source then)"},
		},
		Action: inferAction,
	}
}

func inferAction(c *cli.Context) error {
	prompt := strings.Join(c.Args().Slice(), " ")
	if prompt == "" && !term.IsTerminal(int(os.Stdin.Fd())) {
		b, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
		if err != nil {
			return err
		}
		prompt = strings.TrimRight(string(b), "\n")
	}
	if strings.TrimSpace(prompt) == "" {
		return usage("rbee infer needs a PROMPT (as arguments or on stdin)")
	}
	args := api.InferArgs{
		Model: c.String("model"), Prompt: prompt, System: c.String("system"),
		Hive: c.String("hive"), Device: c.String("device"), Pull: c.Bool("pull"),
		Sampling: api.Sampling{
			MaxTokens: c.Int("max-tokens"), Temperature: float32(c.Float64("temperature")),
			TopP: float32(c.Float64("top-p")), TopK: c.Int("top-k"), MinP: float32(c.Float64("min-p")),
			RepeatPenalty: float32(c.Float64("repeat-penalty")), Stop: c.StringSlice("stop"),
		},
	}
	if args.Pull && strings.ContainsAny(args.Model, ":/") {
		// -m is a source: the model is named after its file.
		args.Source = args.Model
		base := args.Source[strings.LastIndexAny(args.Source, ":/")+1:]
		if at := strings.IndexByte(base, '@'); at >= 0 {
			base = base[:at]
		}
		args.Model = strings.TrimSuffix(base, ".gguf")
	}
	if s := c.Int64("seed"); s >= 0 {
		seed := uint32(s)
		args.Sampling.Seed = &seed
	}
	if args.Sampling.MaxTokens < 1 {
		return usage("--max-tokens must be at least 1")
	}
	raw, err := json.Marshal(args)
	if err != nil {
		// Flag values are checked before this; a value JSON cannot carry
		// must not become an empty request.
		return usage("the request cannot be encoded: %v", err)
	}
	timeout := c.Duration("timeout")
	return withSession(c, true, func(ctx context.Context, s *Session) error {
		// A request the bus cannot carry would fail as a raw "maximum
		// payload exceeded": say how large a prompt may be instead. The
		// margin is the rest of the submit request and its headers.
		if limit := s.Bus.NC.MaxPayload(); limit > 0 && int64(len(raw))+1024 > limit {
			mib := func(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
			return api.Fail(api.ReasonPayloadTooLarge, "prompt",
				"the prompt is %s, more than the bus carries in one message (max_payload %s): a prompt must stay below about %s",
				mib(int64(len(prompt)+len(args.System))), mib(limit), mib(max(limit-1024-(int64(len(raw))-int64(len(prompt)+len(args.System))), 0)))
		}
		// The keeper's own deadline: past it, the job is cancelled like on
		// Ctrl-C, but reported as a timeout.
		fctx := ctx
		if timeout > 0 {
			var cancel context.CancelFunc
			fctx, cancel = context.WithTimeoutCause(ctx, timeout, fmt.Errorf("%w after %s (--timeout); the job was cancelled", errTimedOut, timeout))
			defer cancel()
		}
		// The queen's deadline backs the keeper's up, a little later, in
		// case the keeper dies before it can cancel.
		queenTimeout := time.Duration(0)
		if timeout > 0 {
			queenTimeout = timeout + 5*time.Second
		}
		final, err := submitAndFollow(c, s, fctx, api.Operation{Kind: api.OpInfer, Args: raw}, queenTimeout, c.Bool("detach"))
		if err != nil {
			return err
		}
		if r, ok := decodeResult[api.InferResult](final); ok && final.State == api.JobCompleted {
			printer(c).Summary(r)
		}
		return finish(final)
	})
}
