package keeper

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/remote"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
	"golang.org/x/crypto/ssh"
)

func hiveFlag() cli.Flag {
	return &cli.StringFlag{Name: "hive", Usage: "the hive", Required: true}
}

// hiveCall sends a request straight to one hive's endpoint.
func hiveCall(ctx context.Context, s *Session, hive, endpoint string, req, out any, timeout time.Duration) error {
	subject, err := s.Bus.Space.Hive(hive, endpoint)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := s.Bus.Call(cctx, subject, req, out); err != nil {
		if api.CodeOf(err) != 0 {
			return err
		}
		return fmt.Errorf("hive %s did not answer: %w (is it running? `rbee hive start %s`)", hive, err, hive)
	}
	return nil
}

func modelCommand() *cli.Command {
	return &cli.Command{
		Name:  "model",
		Usage: "manage the model catalogs of hives",
		Subcommands: []*cli.Command{
			{Name: "download", Usage: "download a model into a hive's catalog", ArgsUsage: "SOURCE (https://…, hf:org/repo/file.gguf, file:///path)",
				Flags: []cli.Flag{hiveFlag(), &cli.StringFlag{Name: "sha256", Usage: "expected checksum"}, &cli.StringFlag{Name: "name", Usage: "model id (default: the file name)"}},
				Action: func(c *cli.Context) error {
					if err := needArgs(c, 1, "a SOURCE"); err != nil {
						return err
					}
					if err := validID(subjects.KindHive, c.String("hive")); err != nil {
						return err
					}
					if n := c.String("name"); n != "" {
						if err := subjects.ValidateModelID(n); err != nil {
							return err
						}
					}
					raw, _ := json.Marshal(api.ModelAddArgs{Hive: c.String("hive"), Source: c.Args().First(), Name: c.String("name"), SHA256: c.String("sha256")})
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						final, err := submitAndFollow(c, s, ctx, api.Operation{Kind: api.OpModelDownload, Args: raw}, 0, false)
						if err != nil {
							return err
						}
						if m, ok := decodeResult[api.Model](final); ok {
							show(c, m, func(w io.Writer) {
								fmt.Fprintf(w, "model %s added to hive %s (%s)\n", m.ID, c.String("hive"), humanBytes(uint64(m.Size)))
							})
						}
						return finish(final)
					})
				}},
			{Name: "synth", Usage: "generate a small random model into a hive's catalog (offline demo and tests)", ArgsUsage: "NAME",
				Flags: []cli.Flag{hiveFlag(), &cli.StringFlag{Name: "size", Usage: "tiny or large", Value: "tiny"}},
				Action: func(c *cli.Context) error {
					if err := needArgs(c, 1, "a model NAME"); err != nil {
						return err
					}
					name := c.Args().First()
					if err := validModelArgs(c, name); err != nil {
						return err
					}
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						var m api.Model
						if err := hiveCall(ctx, s, c.String("hive"), api.HiveEpModelSynth, api.ModelSynthArgs{Name: name, Size: c.String("size")}, &m, 2*time.Minute); err != nil {
							return err
						}
						show(c, m, func(w io.Writer) {
							fmt.Fprintf(w, "model %s generated on hive %s (%s)\n", m.ID, c.String("hive"), humanBytes(uint64(m.Size)))
						})
						return nil
					})
				}},
			{Name: "list", Usage: "list models on one or all online hives", Flags: []cli.Flag{&cli.StringFlag{Name: "hive", Usage: "only this hive"}},
				Action: func(c *cli.Context) error {
					hive := c.String("hive")
					if hive != "" {
						if err := validID(subjects.KindHive, hive); err != nil {
							return err
						}
					}
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						if err := awaitLiveness(ctx, s); err != nil {
							return err
						}
						var lists []api.ModelListReply
						if err := call(ctx, s, api.EpModelList, api.HiveRequest{Name: hive}, &lists); err != nil {
							return err
						}
						if hive != "" && len(lists) == 0 {
							return hiveNotListing(ctx, s, hive)
						}
						if c.Bool("json") {
							p := printer(c)
							for _, l := range lists {
								for _, m := range l.Models {
									p.JSONValue(map[string]any{"hive": l.Hive, "model": m})
								}
							}
							return nil
						}
						w := tabwriter.NewWriter(os.Stdout, 0, 2, 2, ' ', 0)
						fmt.Fprintln(w, "HIVE\tMODEL\tSIZE\tARCH\tQUANT\tCONTEXT\tMEMORY\tSOURCE")
						for _, l := range lists {
							for _, m := range l.Models {
								fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", l.Hive, m.ID, humanBytes(uint64(m.Size)), m.Architecture, m.Quantization, m.ContextLength, humanBytes(m.EstimatedMemory), m.Source)
							}
						}
						return w.Flush()
					})
				}},
			{Name: "get", Usage: "show one model of a hive", ArgsUsage: "MODEL", Flags: []cli.Flag{hiveFlag()}, Action: func(c *cli.Context) error {
				if err := needArgs(c, 1, "a MODEL"); err != nil {
					return err
				}
				if err := validModelArgs(c, c.Args().First()); err != nil {
					return err
				}
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					var m api.Model
					if err := hiveCall(ctx, s, c.String("hive"), api.HiveEpModelGet, api.ModelRequest{Model: c.Args().First()}, &m, 10*time.Second); err != nil {
						return err
					}
					show(c, m, func(w io.Writer) { printModel(w, c.String("hive"), m) })
					return nil
				})
			}},
			{Name: "delete", Usage: "delete a model from a hive (refused while a worker uses it unless --force)", ArgsUsage: "MODEL",
				Flags: []cli.Flag{hiveFlag(), &cli.BoolFlag{Name: "force", Usage: "stop workers using it first"}},
				Action: func(c *cli.Context) error {
					if err := needArgs(c, 1, "a MODEL"); err != nil {
						return err
					}
					if err := validModelArgs(c, c.Args().First()); err != nil {
						return err
					}
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						if err := hiveCall(ctx, s, c.String("hive"), api.HiveEpModelDelete, api.ModelRequest{Model: c.Args().First(), Force: c.Bool("force")}, nil, time.Minute); err != nil {
							return err
						}
						show(c, map[string]string{"deleted": c.Args().First()}, func(w io.Writer) {
							fmt.Fprintf(w, "model %s deleted from hive %s\n", c.Args().First(), c.String("hive"))
						})
						return nil
					})
				}},
		},
	}
}

// validModelArgs checks a model id and the --hive it is meant for, as
// ids, before anything is sent.
func validModelArgs(c *cli.Context, model string) error {
	if err := validID(subjects.KindHive, c.String("hive")); err != nil {
		return err
	}
	return subjects.ValidateModelID(model)
}

// hiveNotListing explains why a hive named in `model list --hive` gave no
// catalog: it is unknown, or not running.
func hiveNotListing(ctx context.Context, s *Session, hive string) error {
	var v api.HiveView
	if err := call(ctx, s, api.EpHiveGet, api.HiveRequest{Name: hive}, &v); err != nil {
		if api.CodeOf(err) == api.CodeNotFound {
			return api.Fail(api.ReasonNotFound, "", "hive %s is unknown: it is not in the inventory and not running (see `rbee hive list`)", hive)
		}
		return err
	}
	return fmt.Errorf("hive %s is %s; its models are listed while it runs (`rbee hive start %s`)", hive, v.State, hive)
}

// findWorker looks a worker up in the queen's list (once the queen can know
// who is alive).
func findWorker(ctx context.Context, s *Session, id string) (api.WorkerStatus, error) {
	if err := awaitLiveness(ctx, s); err != nil {
		return api.WorkerStatus{}, err
	}
	var r api.WorkerListReply
	if err := call(ctx, s, api.EpWorkerList, api.HiveRequest{}, &r); err != nil {
		return api.WorkerStatus{}, err
	}
	for _, w := range r.Workers {
		if w.ID == id {
			return w, nil
		}
	}
	return api.WorkerStatus{}, api.Fail(api.ReasonNotFound, "", "worker %s is unknown: no worker of that id is running (see `rbee worker list`)", id)
}

func workerCommand() *cli.Command {
	return &cli.Command{
		Name:  "worker",
		Usage: "spawn, list and stop workers",
		Subcommands: []*cli.Command{
			{Name: "spawn", Usage: "start a worker for a model on a hive", Flags: []cli.Flag{
				hiveFlag(),
				&cli.StringFlag{Name: "model", Aliases: []string{"m"}, Usage: "model id", Required: true},
				&cli.StringFlag{Name: "device", Usage: "cpu or cuda:N", Value: "cpu"},
				&cli.IntFlag{Name: "slots", Usage: "requests served at once, batched (default: what fits in the machine's free memory, at most 4)"},
				&cli.IntFlag{Name: "ctx", Usage: "context size", Value: 2048},
			}, Action: func(c *cli.Context) error {
				if err := validModelArgs(c, c.String("model")); err != nil {
					return err
				}
				if c.Int("slots") < 0 {
					return usage("--slots must be at least 1 (or 0: from free memory)")
				}
				if c.Int("ctx") < 1 {
					return usage("--ctx must be at least 1")
				}
				raw, _ := json.Marshal(api.WorkerSpawnArgs{Hive: c.String("hive"), Model: c.String("model"), Device: c.String("device"), Slots: c.Int("slots"), Ctx: c.Int("ctx")})
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					final, err := submitAndFollow(c, s, ctx, api.Operation{Kind: api.OpWorkerSpawn, Args: raw}, 0, false)
					if err != nil {
						return err
					}
					if w, ok := decodeResult[api.WorkerStatus](final); ok {
						show(c, w, func(out io.Writer) {
							fmt.Fprintf(out, "worker %s serves %s on hive %s (%s, %d slot%s)\n", w.ID, w.Model, w.Hive, w.Device, w.SlotsTotal, map[bool]string{true: "s"}[w.SlotsTotal != 1])
						})
					}
					return finish(final)
				})
			}},
			{Name: "list", Usage: "list workers", Flags: []cli.Flag{&cli.StringFlag{Name: "hive", Usage: "only this hive"}}, Action: func(c *cli.Context) error {
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					if err := awaitLiveness(ctx, s); err != nil {
						return err
					}
					var r api.WorkerListReply
					if err := call(ctx, s, api.EpWorkerList, api.HiveRequest{Name: c.String("hive")}, &r); err != nil {
						return err
					}
					return listing(c, r.Workers, "WORKER\tHIVE\tMODEL\tDEVICE\tSTATE\tSLOTS\tTOKENS\tTOKENS/S", func(wk api.WorkerStatus) string {
						return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%d/%d\t%d\t%.1f", wk.ID, wk.Hive, wk.Model, wk.Device, wk.State, wk.SlotsBusy, wk.SlotsTotal, wk.TokensServed, wk.TokensPerSec)
					})
				})
			}},
			{Name: "get", Usage: "show one worker", ArgsUsage: "ID", Action: func(c *cli.Context) error {
				id, err := idArg(c, subjects.KindWorker, "a worker ID")
				if err != nil {
					return err
				}
				return withSession(c, true, func(ctx context.Context, s *Session) error {
					w, err := findWorker(ctx, s, id)
					if err != nil {
						return err
					}
					show(c, w, func(out io.Writer) { printWorker(out, w, time.Now()) })
					return nil
				})
			}},
			{Name: "stop", Usage: "drain a worker, then SIGTERM, then SIGKILL", ArgsUsage: "ID",
				Flags: []cli.Flag{&cli.DurationFlag{Name: "grace", Usage: "time to finish in-flight work", Value: 10 * time.Second}},
				Action: func(c *cli.Context) error {
					id, err := idArg(c, subjects.KindWorker, "a worker ID")
					if err != nil {
						return err
					}
					raw, _ := json.Marshal(api.WorkerStopArgs{Worker: id, Grace: api.Duration(c.Duration("grace"))})
					return withSession(c, true, func(ctx context.Context, s *Session) error {
						// Refused here, not as a failed job: a typo makes no job.
						if _, err := findWorker(ctx, s, id); err != nil {
							return err
						}
						final, err := submitAndFollow(c, s, ctx, api.Operation{Kind: api.OpWorkerStop, Args: raw}, 0, false)
						if err != nil {
							return err
						}
						return finish(final)
					})
				}},
		},
	}
}

// hiveTrust records a hive machine's host key after showing its
// fingerprint: the explicit step that replaces silently trusting a host.
func hiveTrust(c *cli.Context) error {
	n, err := idArg(c, subjects.KindHive, "a hive NAME")
	if err != nil {
		return err
	}
	return withSession(c, true, func(ctx context.Context, s *Session) error {
		var v api.HiveView
		if err := call(ctx, s, api.EpHiveGet, api.HiveRequest{Name: n}, &v); err != nil {
			return err
		}
		if v.Entry == nil || v.Entry.SSH == nil {
			return fmt.Errorf("hive %s is not reached over SSH; there is no host key to trust", n)
		}
		var opts []remote.Option
		if p := os.Getenv("RBEE_SSH_CONFIG"); p != "" {
			opts = append(opts, remote.WithConfigFile(p))
		}
		knownHosts := os.Getenv("RBEE_SSH_KNOWN_HOSTS")
		if knownHosts != "" {
			opts = append(opts, remote.WithKnownHosts(knownHosts))
		}
		target, err := remote.ParseTarget(v.Entry.SSH.Spec, opts...)
		if err != nil {
			return err
		}
		key, err := remote.ScanHostKey(ctx, target, opts...)
		if err != nil {
			return err
		}
		if err := remote.Trust(target, key, knownHosts); err != nil {
			return err
		}
		show(c, map[string]string{"hive": n, "host": target.String(), "fingerprint": ssh.FingerprintSHA256(key)}, func(w io.Writer) {
			fmt.Fprintf(w, "trusted %s host key %s for hive %s (%s)\n", key.Type(), ssh.FingerprintSHA256(key), n, target.String())
		})
		return nil
	})
}
