package keeper

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
)

// --- queen ---

func queenCommand() *cli.Command {
	return &cli.Command{
		Name:  "queen",
		Usage: "start, stop or inspect the local queen",
		Subcommands: []*cli.Command{
			{Name: "start", Usage: "start queen-rbee in the background with the embedded bus", Action: queenStart},
			{Name: "stop", Usage: "stop the local queen", Action: queenStop},
			{Name: "status", Usage: "is the queen up, and where", Action: queenStatus},
		},
	}
}

func queenStart(c *cli.Context) error {
	if c.String(cliutil.FlagNATS) != "" {
		return usage("rbee queen start runs a local queen; it does not take --nats")
	}
	ctx := c.Context
	p := printer(c)
	if b, err := waitQueen(ctx, c, LocalURL(), 500*time.Millisecond); err == nil {
		b.NC.Close()
		p.Message("[rbee] a queen is already running at %s", LocalURL())
		return nil
	}
	home := cliutil.Home()
	qp, err := startQueen(ctx, c, home)
	if err != nil {
		return err
	}
	b, err := waitQueen(ctx, c, LocalURL(), 15*time.Second)
	if err != nil {
		_, _ = qp.Stop(context.Background(), 5*time.Second)
		return fmt.Errorf("queen-rbee did not answer within 15s: %v\nlast lines of %s:\n%s", err, qp.Log, proc.Tail(qp.Log, 10))
	}
	b.NC.Close()
	show(c, map[string]any{"pid": qp.Pid, "bus": LocalURL(), "log": qp.Log}, func(w io.Writer) {
		fmt.Fprintf(w, "queen started (pid %d) on %s; log: %s\n", qp.Pid, LocalURL(), qp.Log)
	})
	return nil
}

func queenStop(c *cli.Context) error {
	home := cliutil.Home()
	pid := queenPID(home)
	if pid == 0 {
		printer(c).Message("[rbee] no local queen is running")
		return nil
	}
	sig, err := proc.Terminate(c.Context, pid, 15*time.Second)
	if err != nil {
		return err
	}
	show(c, map[string]any{"pid": pid, "stopped": true, "signal": sig}, func(w io.Writer) {
		fmt.Fprintf(w, "queen stopped (pid %d)\n", pid)
	})
	return nil
}

func queenStatus(c *cli.Context) error {
	return withSession(c, false, func(ctx context.Context, s *Session) error {
		var st api.Status
		if err := call(ctx, s, api.EpStatus, nil, &st); err != nil {
			return err
		}
		show(c, map[string]any{"running": true, "version": st.Version, "uptime": st.Uptime, "bus": s.Bus.NC.ConnectedUrlRedacted()}, func(w io.Writer) {
			fmt.Fprintf(w, "queen %s is running on %s (up %s)\n", st.Version, s.Bus.NC.ConnectedUrlRedacted(), time.Duration(st.Uptime))
		})
		return nil
	})
}

// --- status ---

func statusAction(c *cli.Context) error {
	return askLive(c, api.EpStatus, nil, func(w io.Writer, st api.Status) { printStatus(w, st) })
}

func printStatus(out io.Writer, st api.Status) {
	fmt.Fprintf(out, "queen %s, up %s\n", st.Version, time.Duration(st.Uptime))
	switch {
	case st.Queen == "":
	case st.Role == api.QueenLeader:
		fmt.Fprintf(out, "answered by queen %s, which leads (runs the scheduler)\n", st.Queen)
	case st.Leader != "":
		fmt.Fprintf(out, "answered by queen %s, standing by; queen %s leads\n", st.Queen, st.Leader)
	default:
		fmt.Fprintf(out, "answered by queen %s, standing by; no queen leads right now\n", st.Queen)
	}
	for _, p := range st.Problems {
		fmt.Fprintf(out, "warning: %s\n", p)
	}
	fmt.Fprintln(out)
	w := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(w, "HIVE\tSTATE\tADDRESS\tDEVICES\tRAM FREE\tWORKERS")
	for _, h := range st.Hives {
		devices, ram, workers := "-", "-", "-"
		if seen(h) && h.State == api.HiveOnline {
			devices = deviceSummary(h.Status.Capabilities)
			ram = humanBytes(h.Status.RAMFree)
			workers = fmt.Sprint(len(h.Status.Workers))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", h.Name, h.State, h.Address, devices, ram, workers)
	}
	w.Flush()
	fmt.Fprintln(out)
	w = tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(w, "WORKER\tHIVE\tMODEL\tDEVICE\tSTATE\tSLOTS\tTOKENS/S")
	for _, wk := range st.Workers {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%.1f\n", wk.ID, wk.Hive, wk.Model, wk.Device, wk.State, wk.SlotsBusy, wk.SlotsTotal, wk.TokensPerSec)
	}
	w.Flush()
	fmt.Fprintln(out)
	models := make([]string, 0, len(st.Queues))
	for m := range st.Queues {
		models = append(models, m)
	}
	sort.Strings(models)
	fmt.Fprint(out, "QUEUES:")
	if len(models) == 0 {
		fmt.Fprint(out, " empty")
	}
	for _, m := range models {
		fmt.Fprintf(out, " %s=%d", m, st.Queues[m])
	}
	fmt.Fprintln(out)
	fmt.Fprintf(out, "JOBS: queued=%d running=%d completed=%d failed=%d cancelled=%d\n",
		st.Jobs[api.JobQueued], st.Jobs[api.JobRunning], st.Jobs[api.JobCompleted], st.Jobs[api.JobFailed], st.Jobs[api.JobCancelled])
}

func deviceSummary(caps api.Capabilities) string {
	parts := []string{fmt.Sprintf("cpu(%d)", caps.CPU.Threads)}
	for _, g := range caps.GPUs {
		parts = append(parts, fmt.Sprintf("cuda:%d %s %s free", g.Index, g.Name, humanBytes(g.VRAMFree)))
	}
	return strings.Join(parts, " ")
}

// --- hives ---

func hiveCommand() *cli.Command {
	name := func(c *cli.Context) (string, error) { return idArg(c, subjects.KindHive, "a hive NAME") }
	jobOp := func(kind, usageText string) *cli.Command {
		return &cli.Command{Name: strings.TrimPrefix(kind, "hive."), Usage: usageText, ArgsUsage: "NAME", Action: func(c *cli.Context) error {
			n, err := name(c)
			if err != nil {
				return err
			}
			return withSession(c, true, func(ctx context.Context, s *Session) error {
				args, _ := json.Marshal(map[string]string{"name": n})
				final, err := submitAndFollow(c, s, ctx, api.Operation{Kind: kind, Args: args}, 0, false)
				if err != nil {
					return err
				}
				return finish(final)
			})
		}}
	}
	return &cli.Command{
		Name:  "hive",
		Usage: "manage hives: the machines that run workers",
		Subcommands: []*cli.Command{
			{Name: "add", Usage: "add a hive to the inventory", ArgsUsage: "NAME",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "ssh", Usage: "user@host[:port] or an ~/.ssh/config alias; omit for this machine"},
					&cli.StringFlag{Name: "identity", Usage: "SSH private key for this hive"},
					&cli.StringFlag{Name: "bin-dir", Usage: "local hive: where rbee-hive and llm-worker-rbee live (default: next to queen-rbee)"},
					&cli.StringFlag{Name: "prefix", Usage: "SSH hive: install root on that machine (bin/, share/rbee/)", Value: ""},
				},
				Action: func(c *cli.Context) error {
					n, err := name(c)
					if err != nil {
						return err
					}
					req := api.HiveAddRequest{Name: n, SSH: c.String("ssh"), IdentityFile: c.String("identity"), BinDir: c.String("bin-dir"), Prefix: c.String("prefix")}
					return ask(c, api.EpHiveAdd, req, func(w io.Writer, e api.InventoryEntry) {
						fmt.Fprintf(w, "hive %s added (%s)\n", e.Name, e.Address())
					})
				}},
			{Name: "remove", Usage: "remove a hive from the inventory", ArgsUsage: "NAME", Action: func(c *cli.Context) error {
				n, err := name(c)
				if err != nil {
					return err
				}
				return ask(c, api.EpHiveRemove, api.HiveRequest{Name: n}, func(w io.Writer, _ api.InventoryEntry) {
					fmt.Fprintf(w, "hive %s removed\n", n)
				})
			}},
			{Name: "list", Usage: "list hives and whether they are online", Action: func(c *cli.Context) error {
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					if err := awaitLiveness(ctx, s); err != nil {
						return err
					}
					var r api.HiveListReply
					if err := call(ctx, s, api.EpHiveList, nil, &r); err != nil {
						return err
					}
					now := time.Now()
					return listing(c, r.Hives, "NAME\tSTATE\tADDRESS\tDEVICES\tLAST SEEN", func(h api.HiveView) string {
						return hiveRow(h, now)
					})
				})
			}},
			{Name: "get", Usage: "show one hive", ArgsUsage: "NAME", Action: hiveGet},
			{Name: "status", Usage: "live status of one hive", ArgsUsage: "NAME", Action: hiveGet},
			{Name: "refresh", Usage: "detect a hive's capabilities again", ArgsUsage: "NAME", Action: func(c *cli.Context) error {
				n, err := name(c)
				if err != nil {
					return err
				}
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					subject, _ := s.Bus.Space.Hive(n, api.HiveEpCapabilities)
					cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
					defer cancel()
					var caps api.Capabilities
					if err := s.Bus.Call(cctx, subject, nil, &caps); err != nil {
						return fmt.Errorf("hive %s did not answer: %w (is it running? `rbee hive start %s`)", n, err, n)
					}
					show(c, caps, func(w io.Writer) { printCapabilities(w, n, caps) })
					return nil
				})
			}},
			jobOp(api.OpHiveStart, "start a hive (locally, or over SSH) and wait until it registers"),
			jobOp(api.OpHiveStop, "stop a hive: ask it, then SIGTERM, then SIGKILL"),
			jobOp(api.OpHiveInstall, "copy rbee-hive and llm-worker-rbee to the hive's machine over SSH"),
			jobOp(api.OpHiveUninstall, "remove the binaries from the hive's machine"),
			{Name: "trust", Usage: "record the SSH host key of a hive's machine in known_hosts", ArgsUsage: "NAME", Action: hiveTrust},
		},
	}
}

func hiveGet(c *cli.Context) error {
	n, err := idArg(c, subjects.KindHive, "a hive NAME")
	if err != nil {
		return err
	}
	return askLive(c, api.EpHiveGet, api.HiveRequest{Name: n}, func(w io.Writer, v api.HiveView) {
		printHiveView(w, v, time.Now())
	})
}

func printCapabilities(w io.Writer, name string, caps api.Capabilities) {
	fmt.Fprintf(w, "  %s: %s/%s, CPU %s (%d cores, %d threads), RAM %s free of %s, backends %s\n",
		caps.Hostname, caps.OS, caps.Arch, caps.CPU.Model, caps.CPU.Cores, caps.CPU.Threads,
		humanBytes(caps.RAMFree), humanBytes(caps.RAMTotal), strings.Join(caps.Backends, ","))
	for _, g := range caps.GPUs {
		fmt.Fprintf(w, "  cuda:%d %s, %s free of %s, compute %s, driver %s\n", g.Index, g.Name, humanBytes(g.VRAMFree), humanBytes(g.VRAMTotal), g.ComputeCapability, g.Driver)
	}
	if caps.GPUError != "" {
		fmt.Fprintf(w, "  GPU detection failed: %s\n", caps.GPUError)
	}
}

// --- jobs ---

func jobsCommand() *cli.Command {
	jobID := func(c *cli.Context) (string, error) { return idArg(c, subjects.KindJob, "a job ID") }
	return &cli.Command{
		Name:  "jobs",
		Usage: "list, inspect, follow and cancel jobs",
		Subcommands: []*cli.Command{
			{Name: "list", Usage: "list jobs, newest first", Flags: []cli.Flag{
				&cli.StringFlag{Name: "state", Usage: "only jobs in this state: queued, running, completed, failed, cancelled"},
				&cli.IntFlag{Name: "limit", Usage: "at most this many (0 = all)", Value: 50},
			}, Action: func(c *cli.Context) error {
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					// The queen answers in pages that each fit the bus's max
					// payload; walk them until the limit or the last page.
					limit := c.Int("limit")
					req := api.JobListRequest{State: api.JobState(c.String("state"))}
					var list []api.Job
					for {
						req.Limit = 0
						if limit > 0 {
							req.Limit = limit - len(list)
						}
						var r api.JobListReply
						if err := call(ctx, s, api.EpJobList, req, &r); err != nil {
							return err
						}
						list = append(list, r.Jobs...)
						if r.Next == "" || r.Next == req.Before || (limit > 0 && len(list) >= limit) {
							break
						}
						req.Before = r.Next
					}
					if limit > 0 && len(list) > limit {
						list = list[:limit]
					}
					return listing(c, list, "ID\tOPERATION\tSTATE\tCREATED\tWHERE\tERROR", func(j api.Job) string {
						return strings.Join([]string{j.ID, j.Op.Kind, string(j.State), j.CreatedAt.Local().Format(time.DateTime), joinNonEmpty(j.Hive, j.Worker), j.Error}, "\t")
					})
				})
			}},
			{Name: "get", Usage: "show one job's record", ArgsUsage: "ID", Action: func(c *cli.Context) error {
				id, err := jobID(c)
				if err != nil {
					return err
				}
				return ask(c, api.EpJobGet, api.JobRequest{ID: id}, printJob)
			}},
			{Name: "attach", Usage: "follow a job's narration and tokens from the start (or --from SEQ)", ArgsUsage: "ID",
				Flags: []cli.Flag{&cli.Uint64Flag{Name: "from", Usage: "resume at this stream sequence"}},
				Action: func(c *cli.Context) error {
					id, err := jobID(c)
					if err != nil {
						return err
					}
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						var j api.Job
						if err := call(ctx, s, api.EpJobGet, api.JobRequest{ID: id}, &j); err != nil {
							return err
						}
						p := printer(c)
						final, err := follow(ctx, s, p, id, c.Uint64("from"), false)
						if err != nil {
							return err
						}
						if r, ok := decodeResult[api.InferResult](final); ok && j.Op.Kind == api.OpInfer && final.State == api.JobCompleted {
							p.Summary(r)
						}
						return finish(final)
					})
				}},
			{Name: "cancel", Usage: "cancel a job", ArgsUsage: "ID", Action: func(c *cli.Context) error {
				id, err := jobID(c)
				if err != nil {
					return err
				}
				return ask(c, api.EpJobCancel, api.JobRequest{ID: id}, func(w io.Writer, j api.Job) {
					fmt.Fprintf(w, "job %s %s\n", j.ID, j.State)
				})
			}},
		},
	}
}

// --- trace ---

func traceCommand() *cli.Command {
	return &cli.Command{
		Name: "trace", Usage: "live narration of the whole cluster", ArgsUsage: "[FILTER]",
		Description: "Shows every narration line on the bus as it happens, until Ctrl-C.\n\n" +
			"FILTER, if given, keeps only the lines that contain it (case-sensitive) in their\n" +
			"subject, component, actor id, hive id, worker id or text: a job id\n" +
			"(rbee trace job-123), a hive (rbee trace gpu1), a worker, or a word (rbee trace lost).",
		Action: traceAction,
	}
}

func traceAction(c *cli.Context) error {
	if c.NArg() > 1 {
		return usage("rbee trace takes at most one FILTER")
	}
	filter := c.Args().First()
	return withSession(c, false, func(ctx context.Context, s *Session) error {
		p := printer(c)
		msgs := make(chan *nats.Msg, 1024)
		for _, subj := range []string{s.Bus.Space.AllNarration(), s.Bus.Space.ClusterNarration()} {
			sub, err := s.Bus.NC.ChanSubscribe(subj, msgs)
			if err != nil {
				return err
			}
			defer func() { _ = sub.Unsubscribe() }()
		}
		p.Message("[rbee] tracing narration on %s (Ctrl-C to stop)", s.Bus.NC.ConnectedUrlRedacted())
		for {
			select {
			case <-ctx.Done():
				return nil
			case m := <-msgs:
				var n api.Narration
				if json.Unmarshal(m.Data, &n) != nil {
					continue
				}
				if filter != "" && !strings.Contains(m.Subject+" "+n.Actor.Component+" "+n.Actor.ID+" "+n.HiveID+" "+n.WorkerID+" "+n.Human, filter) {
					continue
				}
				if p.JSON {
					p.JSONValue(n)
					continue
				}
				job := n.JobID
				if job == "" {
					job = "-"
				}
				fmt.Fprintf(os.Stdout, "%s %-16s %s [%s] %s\n", n.Time.Local().Format("15:04:05.000"), job, n.Level, actorLabel(n.Actor), n.Human)
			}
		}
	})
}
