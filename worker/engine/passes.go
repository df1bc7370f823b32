package engine

import (
	"math"
	"time"
)

// Passes of a generating step.
//
// A step in which every sequence generates (each decodes its next token,
// no prompt is fed) can decode its k sequences in one forward pass, or in
// several narrower passes one after the other. One pass reads the weights
// once for all of them: that is what batching is for where the weights
// come from memory (a large model on a CPU) and on a GPU. But where a model
// sits in the CPU's caches the cost is arithmetic, and llama.cpp's CPU
// kernels are not equally good at every width: on the 26 M test model, one
// thread, this project's AMD 2-core VM, a pass of 2 tokens (tinyBLAS's 4×2
// tile) took about 5 ms, two passes of 1 (ggml's F16 dot product) 3.8 ms,
// while 3 or 4 tokens in one pass beat as many passes of 1. No rule of
// thumb holds across models, CPUs and GPUs, so each lane measures what a
// pass of each width costs it and splits a step into the passes that cost
// least by those measures. A pass costs one graph's evaluation and its
// sampling; a sequence's output depends on the width of the passes it was
// decoded in no more than on the batch it was decoded in before.
type passPlanner struct {
	// cost is, by width n, what a pass of n tokens costs (a running
	// estimate, seconds); 0 is not measured yet.
	cost []float64
	// at is, by width, the step in which cost was last measured.
	at    []uint64
	steps uint64
	// pinned keeps the costs as they are, and the plan to the cheapest by
	// them: tests choose the passes with it.
	pinned bool

	best  []float64 // scratch of cheapest, by width
	first []int
}

const (
	// passRefresh is how many steps a width's cost is trusted without a
	// new measure. A width out of use is measured again after it, so that
	// a cost measured once under a passing load, or at shorter contexts,
	// does not decide for ever; each such measure costs a step one more
	// pass than its best (on a GPU, where one pass is always best, about
	// one step in a hundred of the widest does two passes).
	passRefresh = 512
	// passWeight is the weight of a new measure in the running estimate.
	passWeight = 0.25
	// passMargin is how much cheaper several passes must be measured
	// than one to be chosen over it: estimates a few percent apart are
	// within the noise, and one pass is the simpler way.
	passMargin = 0.03
)

func newPassPlanner(widest int) *passPlanner {
	return &passPlanner{
		cost: make([]float64, widest+1), at: make([]uint64, widest+1),
		best: make([]float64, widest+1), first: make([]int, widest+1),
	}
}

// plan appends to dst the widths of the passes that decode a step of k
// generating sequences, in order, and counts the step. A width never
// measured, or not for passRefresh steps, is measured first: the whole
// step, or one pass of it and the rest, the rest in one pass where that is
// due too.
func (p *passPlanner) plan(k int, dst []int) []int {
	if k <= 1 || k >= len(p.cost) {
		return append(dst, k)
	}
	p.steps++
	if !p.pinned {
		if p.due(k) {
			return append(dst, k)
		}
		for n := k - 1; n >= 1; n-- {
			if !p.due(n) {
				continue
			}
			dst = append(dst, n)
			if p.due(k - n) {
				return append(dst, k-n)
			}
			return p.cheapest(k-n, dst)
		}
	}
	return p.cheapest(k, dst)
}

func (p *passPlanner) due(n int) bool {
	return p.cost[n] == 0 || p.steps-p.at[n] > passRefresh
}

// cheapest appends the widths of the cheapest passes for k tokens by the
// measured costs (one pass of k where they cannot tell).
func (p *passPlanner) cheapest(k int, dst []int) []int {
	p.best[0] = 0
	for j := 1; j <= k; j++ {
		p.best[j], p.first[j] = math.Inf(1), 0
		for n := j; n >= 1; n-- {
			if p.cost[n] == 0 {
				continue
			}
			if c := p.best[j-n] + p.cost[n]; c < p.best[j] {
				p.best[j], p.first[j] = c, n
			}
		}
	}
	if math.IsInf(p.best[k], 1) || (p.cost[k] > 0 && p.best[k] > p.cost[k]*(1-passMargin)) {
		return append(dst, k)
	}
	for j := k; j > 0; j -= p.first[j] {
		dst = append(dst, p.first[j])
	}
	return dst
}

// observe records what a pass of n tokens took. A width in use moves its
// estimate a little each step, one measure counting for at most half again
// the estimate: a pass the machine preempted (on a VM, a few milliseconds
// now and then) would otherwise put it out of use until its next refresh.
// A width measured again after passRefresh steps takes the new measure as
// it is: the old one says little by then, and an out-of-use width that
// became cheap is taken up at once (a preempted measure only leaves it out
// of use until the next).
func (p *passPlanner) observe(n int, d time.Duration) {
	if n < 1 || n >= len(p.cost) || p.pinned {
		return
	}
	s := d.Seconds()
	if c := p.cost[n]; c > 0 && !p.due(n) {
		s = c + passWeight*(min(s, 1.5*c)-c)
	}
	p.cost[n] = max(s, 1e-9)
	p.at[n] = p.steps
}
