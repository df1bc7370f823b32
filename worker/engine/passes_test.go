package engine

import (
	"math"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// measuredCPU is what a pass of n tokens costs, by width (ms), shaped
// after what a lane of the 26 M test model measured with one thread on this
// project's AMD 2-core VM (2026-12-07): 1.9 ms alone and 5.0 for two in one
// pass where two ran, and from 3 to 8 tokens what eight running measured.
// tinyBLAS's tiles make 2 and 8 tokens in a pass dear, 6 cheap.
var measuredCPU = []float64{0, 1.9, 5.0, 5.3, 6.0, 6.3, 6.8, 9.0, 12.9}

// costOf is a pass cost function from a table of milliseconds.
func costOf(ms []float64) func(int) time.Duration {
	return func(n int) time.Duration { return time.Duration(ms[n] * float64(time.Millisecond)) }
}

// optimum is the least cost of k tokens in passes, by brute force.
func optimum(ms []float64, k int) float64 {
	if k == 0 {
		return 0
	}
	best := math.Inf(1)
	for n := 1; n <= k; n++ {
		best = min(best, ms[n]+optimum(ms, k-n))
	}
	return best
}

func total(ms []float64, plan []int) float64 {
	s := 0.0
	for _, n := range plan {
		s += ms[n]
	}
	return s
}

// drive runs steps of k tokens through p, each pass costing cost(n), and
// returns the plans it chose.
func drive(p *passPlanner, k, steps int, cost func(int) time.Duration) [][]int {
	var plans [][]int
	for range steps {
		plan := p.plan(k, nil)
		for _, n := range plan {
			p.observe(n, cost(n))
		}
		plans = append(plans, plan)
	}
	return plans
}

func sum(plan []int) int {
	s := 0
	for _, n := range plan {
		s += n
	}
	return s
}

// A planner measures every width it may use, then decodes each step in
// the passes that cost least by its measures, and measures the others
// again now and then only.
func TestPassPlannerSettlesOnTheCheapestPasses(t *testing.T) {
	for _, k := range []int{2, 4, 8} {
		p := newPassPlanner(8)
		plans := drive(p, k, 4000, costOf(measuredCPU))
		want := optimum(measuredCPU, k)
		off := 0
		for i, plan := range plans {
			require.Equal(t, k, sum(plan), "step %d", i)
			if i >= k && total(measuredCPU, plan) > want*(1+passMargin) {
				off++
			}
		}
		last := plans[len(plans)-1]
		assert.InDelta(t, want, total(measuredCPU, last), want*passMargin, "k=%d: %v", k, last)
		assert.LessOrEqual(t, off, len(plans)/100, "k=%d: steps off the cheapest passes", k)
	}
	// What was measured here: two tokens in two passes, four in one, eight
	// in a pass of 7 and one of 1 (or as cheap).
	p := newPassPlanner(8)
	drive(p, 2, 10, costOf(measuredCPU))
	assert.Equal(t, []int{1, 1}, p.plan(2, nil))
	drive(p, 4, 10, costOf(measuredCPU))
	assert.Equal(t, []int{4}, p.plan(4, nil))
}

// Where a wider pass costs little more (a model read from memory, a GPU),
// every step is one pass but for a rare measure of another width.
func TestPassPlannerKeepsOnePassWhereWidthCostsLittle(t *testing.T) {
	p := newPassPlanner(8)
	flat := func(n int) time.Duration { return 25*time.Millisecond + time.Duration(n)*100*time.Microsecond }
	plans := drive(p, 8, 5000, flat)
	more := 0
	for _, plan := range plans[8:] {
		if len(plan) > 1 {
			more++
		}
	}
	assert.Equal(t, []int{8}, plans[len(plans)-1])
	assert.LessOrEqual(t, more, len(plans)/100, "steps of more than one pass")
}

// Nearly equal costs choose one pass: the estimates' noise is not a reason
// to decode twice.
func TestPassPlannerPrefersOnePassWithinTheMargin(t *testing.T) {
	p := newPassPlanner(2)
	drive(p, 2, 10, costOf([]float64{0, 1.99, 4.0}))
	assert.Equal(t, []int{2}, p.plan(2, nil))
}

// A width whose cost changed is measured again, and the plan follows.
func TestPassPlannerFollowsAChangeOfCost(t *testing.T) {
	p := newPassPlanner(2)
	drive(p, 2, 100, costOf([]float64{0, 2, 5}))
	require.Equal(t, []int{1, 1}, p.plan(2, nil))
	plans := drive(p, 2, passRefresh+20, costOf([]float64{0, 2, 3}))
	assert.Equal(t, []int{2}, plans[len(plans)-1])
}

// One pass the machine preempted does not put the width in use out of use.
func TestPassPlannerOutlastsOneSlowPass(t *testing.T) {
	p := newPassPlanner(4)
	drive(p, 4, 100, costOf(measuredCPU[:5]))
	require.Equal(t, []int{4}, p.plan(4, nil))
	p.observe(4, 100*time.Millisecond)
	assert.Equal(t, []int{4}, p.plan(4, nil))
	plans := drive(p, 4, 50, costOf(measuredCPU[:5]))
	assert.True(t, slices.ContainsFunc(plans, func(pl []int) bool { return slices.Equal(pl, []int{4}) }))
}
