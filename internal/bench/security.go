package bench

import (
	"context"
	"fmt"
)

// benchSecurity measures what the bus's security costs the keeper's path:
// the same jobs on three queens side by side, interleaved in each round:
// an open bus (no credentials, no permissions: `--open-bus`), the default
// (nkey credentials and per-role permissions, plain TCP on loopback), and
// the default with TLS (`--tls`, as every listener beyond loopback is).
func benchSecurity(ctx context.Context, e *env) (*Table, error) {
	// Many short rounds: a job of the tiny model takes tens of
	// milliseconds, and on two busy cores one run in ten is an outlier.
	n, rounds := 128, 200
	if e.opts.Quick {
		n, rounds = 64, 3
	}
	t := &Table{
		Intro: fmt.Sprintf("The keeper's path (B of benchmark 1: submit on the bus, follow the job's events) on three queens at once, each with a hive and a warm worker of the tiny model, %d tokens greedy per job, the three interleaved in each of %d rounds (order rotated, one warm-up round): "+
			"**open**, a queen with `--open-bus` (no credentials or permissions: what the bus was before); **secured**, the default (each connection proves an nkey, each role held to its permissions); **secured + TLS**, the default with `--tls` (what any listener beyond loopback is). "+
			"The tiny model is the hardest case: its tokens are cheapest, so the bus's share of each is largest.", n, rounds),
		Header: []string{"bus", "TTFT p50", "TTFT p99", "tokens/s p50", "tok/s ÷ open", "added TTFT p50 (vs open)"},
	}
	type setup struct {
		name string
		args []string
	}
	setups := []setup{{"open", []string{"--open-bus"}}, {"secured", nil}, {"secured + TLS", []string{"--tls"}}}
	clusters := make([]*cluster, len(setups))
	for i, s := range setups {
		c, _, err := e.startQueen(ctx, queenSpec{Args: s.args})
		if err != nil {
			return t, fmt.Errorf("%s: %w", s.name, err)
		}
		defer c.close()
		if _, _, err := c.startHive(ctx, "local"); err != nil {
			return t, fmt.Errorf("%s: %w", s.name, err)
		}
		if err := c.synth(ctx, "local", "tiny", "tiny"); err != nil {
			return t, fmt.Errorf("%s: %w", s.name, err)
		}
		if _, err := c.spawnWorker(ctx, "local", "tiny"); err != nil {
			return t, fmt.Errorf("%s: %w", s.name, err)
		}
		clusters[i] = c
	}
	names := make([]string, len(setups))
	for i, s := range setups {
		names[i] = s.name
	}
	ttft, rate, errs := interleave(ctx, clusters, names, "tiny", n, rounds)
	for i, s := range setups {
		if len(ttft[i]) == 0 {
			t.Rows = append(t.Rows, []string{s.name, "not measured"})
			continue
		}
		rel, added := "", ""
		if i > 0 {
			rel = ratio(rate[i].p50(), rate[0].p50())
			added = ms(ttft[i].p50() - ttft[0].p50())
			r := rate[i].p50() / rate[0].p50()
			e.target(Target{Bench: 9, Claim: fmt.Sprintf("%s: tokens/s ≥ 0.99 of the open bus", s.name), Holds: holds(r >= 0.99),
				Detail: fmt.Sprintf("%s vs %s tokens/s = %.3f", num(rate[i].p50()), num(rate[0].p50()), r)})
			d := ttft[i].p50() - ttft[0].p50()
			e.target(Target{Bench: 9, Claim: fmt.Sprintf("%s: added TTFT ≤ 0.2 ms p50 over the open bus", s.name), Holds: holds(d <= 0.2),
				Detail: fmt.Sprintf("%s (%s vs %s)", ms(d), ms(ttft[i].p50()), ms(ttft[0].p50()))})
		}
		t.Rows = append(t.Rows, []string{s.name, ms(ttft[i].p50()), ms(ttft[i].p99()), num(rate[i].p50()), rel, added})
	}
	if len(errs) > 0 {
		t.Notes = append(t.Notes, "Failed jobs: "+fmt.Sprint(errs))
	}
	return t, nil
}
