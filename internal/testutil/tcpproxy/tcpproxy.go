// Package tcpproxy is a loopback TCP proxy for tests that need to cut one
// client's connection to a server (a hive's bus connection) without touching
// the server or the client: Cut drops every live connection and refuses new
// ones until Heal. SetLatency makes the link a long one instead, and Stall a
// dead one that neither end sees end.
package tcpproxy

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// dialTimeout bounds how long a new connection waits for the target; a
// target that is down (a queen being restarted) fails the client at once.
const dialTimeout = 2 * time.Second

// Proxy forwards every connection accepted on a loopback port to a target
// address. Its methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup

	// latency is how long each byte takes through the proxy, each way.
	latency atomic.Int64
	// stalled drops every byte, either way, while connections stay open.
	stalled atomic.Bool

	mu     sync.Mutex
	cut    bool
	closed bool
	conns  map[net.Conn]struct{}
}

// Listen starts a proxy on 127.0.0.1 at a free port, forwarding to target
// (host:port). Close stops it.
func Listen(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is the proxy's listening address, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Cut closes every live connection and refuses new ones until Heal. A
// connection attempted during a cut is accepted and closed at once (the
// port stays ours), so the client sees it end as it would on a dropped link.
func (p *Proxy) Cut() {
	p.mu.Lock()
	p.cut = true
	live := p.takeConns()
	p.mu.Unlock()
	for _, c := range live {
		_ = c.Close()
	}
}

// SetLatency makes every byte forwarded from now on, either way, arrive d
// after it was sent (0: at once), as over a long link: order is kept, and
// what is sent meanwhile is not held up behind it.
func (p *Proxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// Stall makes the link a dead one that neither end sees end, as a cable
// pulled or a machine frozen: connections stay open, and everything sent
// either way from now on is lost, not held. Only a client's own timeouts
// tell it; Cut ends the connections, Heal forwards again.
func (p *Proxy) Stall() { p.stalled.Store(true) }

// Heal accepts and forwards new connections again, and ends a Stall.
func (p *Proxy) Heal() {
	p.mu.Lock()
	p.cut = false
	p.mu.Unlock()
	p.stalled.Store(false)
}

// IsCut reports whether the proxy is cut.
func (p *Proxy) IsCut() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cut
}

// Live is the number of connections (client and target sides each count)
// being forwarded now.
func (p *Proxy) Live() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// Close stops listening, closes every connection and waits until every
// goroutine of the proxy has returned.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	live := p.takeConns()
	p.mu.Unlock()
	err := p.ln.Close()
	for _, c := range live {
		_ = c.Close()
	}
	p.wg.Wait()
	return err
}

// takeConns empties the live set; the caller holds mu and closes them.
func (p *Proxy) takeConns() []net.Conn {
	live := make([]net.Conn, 0, len(p.conns))
	for c := range p.conns {
		live = append(live, c)
	}
	clear(p.conns)
	return live
}

// track adds conns to the live set unless the proxy is cut or closed, in
// which case it reports false and the caller closes them.
func (p *Proxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cut || p.closed {
		return false
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

// piece is what one read of a connection returned, and when.
type piece struct {
	data []byte
	at   time.Time
}

// copyDelayed copies src to dst until either fails, each piece written
// the proxy's latency after it was read.
func (p *Proxy) copyDelayed(dst, src net.Conn) {
	pieces := make(chan piece, 256)
	go func() {
		defer close(pieces)
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				pieces <- piece{data: append([]byte(nil), buf[:n]...), at: time.Now()}
			}
			if err != nil {
				return
			}
		}
	}()
	for pc := range pieces {
		if d := time.Duration(p.latency.Load()); d > 0 {
			time.Sleep(time.Until(pc.at.Add(d)))
		}
		if p.stalled.Load() {
			continue
		}
		if _, err := dst.Write(pc.data); err != nil {
			// End the reader too (forward closes both sides anyway).
			_ = src.Close()
			for range pieces {
			}
			return
		}
	}
}

func (p *Proxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // a transient accept error (EMFILE)
			continue
		}
		if !p.track(client) {
			_ = client.Close()
			continue
		}
		p.wg.Add(1)
		go p.forward(client)
	}
}

// forward dials the target for one client and copies both ways until either
// side ends, then closes both.
func (p *Proxy) forward(client net.Conn) {
	defer p.wg.Done()
	target, err := net.DialTimeout("tcp", p.target, dialTimeout)
	if err != nil {
		p.untrack(client)
		_ = client.Close()
		return
	}
	if !p.track(target) {
		// Cut or closed while dialling: the client was closed already.
		p.untrack(client)
		_ = client.Close()
		_ = target.Close()
		return
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		p.copyDelayed(dst, src)
		done <- struct{}{}
	}
	go pipe(target, client)
	go pipe(client, target)
	<-done
	_ = client.Close()
	_ = target.Close()
	<-done
	p.untrack(client, target)
}
