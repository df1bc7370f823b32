package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rs/zerolog"
)

// hopPrice is what a message costs on this machine through the queen's
// bus, in microseconds: one way from one connection to another, and a
// request there and its reply back, each measured back to back (every
// process just ran) and after the machine idled.
type hopPrice struct {
	oneWarm, oneIdle, tripWarm, tripIdle sample
}

// hopIdle is the quiet before each "idle" sample: longer than the gaps
// between a request's hops, as short as the gap between two requests.
const hopIdle = 20 * time.Millisecond

// measureHops times n messages of each kind between the bench's connection
// and a second one to the same server. On a VM, waking an idle virtual CPU
// can cost more than the message itself: this is the machine's part of
// table 1's added TTFT.
func (c *cluster) measureHops(ctx context.Context, n int) (hopPrice, error) {
	var p hopPrice
	other, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.natsURL, Name: "bench-hops", Credentials: c.creds(auth.QueenName), Timeout: time.Second, Log: zerolog.Nop()})
	if err != nil {
		return p, err
	}
	defer other.Close()
	oneWay, trip := c.b.Space.Namespace()+".bench.hop", c.b.Space.Namespace()+".bench.trip"
	got := make(chan time.Time, 1)
	sub, err := other.NC.Subscribe(oneWay, func(*nats.Msg) { got <- time.Now() })
	if err != nil {
		return p, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	echo, err := other.NC.Subscribe(trip, func(m *nats.Msg) { _ = m.Respond(nil) })
	if err != nil {
		return p, err
	}
	defer func() { _ = echo.Unsubscribe() }()
	if err := other.NC.Flush(); err != nil {
		return p, err
	}

	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	for i := 0; i < 2*n && ctx.Err() == nil; i++ {
		idle := i%2 == 1 // alternated, so both kinds see the same machine
		if idle {
			time.Sleep(hopIdle)
		}
		t0 := time.Now()
		if err := c.b.NC.Publish(oneWay, nil); err != nil {
			return p, err
		}
		if err := c.b.NC.FlushTimeout(time.Second); err != nil {
			return p, err
		}
		var hop time.Duration
		select {
		case at := <-got:
			hop = at.Sub(t0)
		case <-time.After(time.Second):
			return p, fmt.Errorf("a message was not delivered within 1s")
		}
		if idle {
			p.oneIdle = append(p.oneIdle, us(hop))
			time.Sleep(hopIdle)
		} else {
			p.oneWarm = append(p.oneWarm, us(hop))
		}
		t0 = time.Now()
		if _, err := c.b.NC.Request(trip, nil, time.Second); err != nil {
			return p, fmt.Errorf("a request: %w", err)
		}
		if idle {
			p.tripIdle = append(p.tripIdle, us(time.Since(t0)))
		} else {
			p.tripWarm = append(p.tripWarm, us(time.Since(t0)))
		}
	}
	return p, ctx.Err()
}

// note says what the prices are, for table 1.
func (p hopPrice) note(n int) string {
	return fmt.Sprintf("The machine's price of a hop (the bench's two connections through the queen's embedded bus, %d samples of each, alternated): a message from one to the other %.0f µs p50 back to back and %.0f µs after %s of nothing; a request and its reply %.0f and %.0f µs. "+
		"B's way to its first token, besides the prefill, is about four round trips in a row (the submit reaching the queen, the record's write, the request queued and handed to the worker, the first token stored and handed to the follower), started from a machine that idled between requests: where the two prices are far apart, the machine's wake-ups are most of B's added TTFT.",
		n, p.oneWarm.p50(), p.oneIdle.p50(), hopIdle, p.tripWarm.p50(), p.tripIdle.p50())
}
