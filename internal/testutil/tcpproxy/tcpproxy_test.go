package tcpproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// echoServer answers every line it reads with the same line, and is closed
// with the test.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// roundTrip sends a line and reads it back, or returns the error that ended
// the connection.
func roundTrip(c net.Conn, line string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return got[:len(got)-1], nil
}

// ended waits for the peer to close c: a read returns EOF or a reset, not a
// timeout.
func ended(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := c.Read(make([]byte, 1))
	require.Error(t, err)
	var ne net.Error
	if errors.As(err, &ne) {
		require.False(t, ne.Timeout(), "the connection was left open: %v", err)
	}
}

func TestForwardsBothWays(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	c := dial(t, p.Addr())
	for _, line := range []string{"hello", "bee", "a longer line through the proxy"} {
		got, err := roundTrip(c, line)
		require.NoError(t, err)
		require.Equal(t, line, got)
	}
	require.Equal(t, 2, p.Live(), "a client side and a target side")
}

func TestCutDropsLiveConnectionsAndRefusesNewOnesUntilHeal(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	live := dial(t, p.Addr())
	_, err = roundTrip(live, "before")
	require.NoError(t, err)

	p.Cut()
	require.True(t, p.IsCut())
	ended(t, live)
	require.Zero(t, p.Live())
	during := dial(t, p.Addr())
	ended(t, during)
	_, err = roundTrip(dial(t, p.Addr()), "during")
	require.Error(t, err, "no traffic passes while cut")

	p.Heal()
	require.False(t, p.IsCut())
	got, err := roundTrip(dial(t, p.Addr()), "after")
	require.NoError(t, err)
	require.Equal(t, "after", got)
}

func TestStallLosesTrafficButKeepsConnectionsOpen(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	c := dial(t, p.Addr())
	_, err = roundTrip(c, "before")
	require.NoError(t, err)

	p.Stall()
	_ = c.SetDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = io.WriteString(c, "lost\n")
	require.NoError(t, err, "the client can still write")
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "nothing comes back, and nothing ends: %v", err)
	require.Equal(t, 2, p.Live())

	p.Heal()
	got, err := roundTrip(c, "after")
	require.NoError(t, err)
	require.Equal(t, "after", got, "what was sent during the stall is lost, not delivered late")
}

func TestTargetDownEndsTheClient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	down := ln.Addr().String()
	require.NoError(t, ln.Close())
	p, err := Listen(down)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	ended(t, dial(t, p.Addr()))
	require.Zero(t, p.Live())
}

func TestCloseEndsEverythingAndStopsListening(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	c := dial(t, p.Addr())
	_, err = roundTrip(c, "x")
	require.NoError(t, err)
	require.NoError(t, p.Close())
	ended(t, c)
	_, err = net.DialTimeout("tcp", p.Addr(), time.Second)
	require.Error(t, err, "nothing listens after Close")
}

// Cut, Heal and new connections racing each other leave no connection
// tracked after a final cut, and nothing running after Close.
func TestConcurrentCutsAndDialsLeaveNothingBehind(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
				if err != nil {
					continue
				}
				_, _ = roundTrip(c, "x")
				_ = c.Close()
			}
		}()
	}
	for range 20 {
		p.Cut()
		time.Sleep(2 * time.Millisecond)
		p.Heal()
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	p.Cut()
	require.Zero(t, p.Live())
	require.NoError(t, p.Close())
}

// A latency delays each way by itself, in order, and what is sent during
// one delay is not held up behind it: ten lines sent at once come back
// one round trip later, not ten.
func TestLatencyDelaysEachWayWithoutQueueing(t *testing.T) {
	p, err := Listen(echoServer(t))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	c := dial(t, p.Addr())
	_, err = roundTrip(c, "warm")
	require.NoError(t, err)
	const d = 100 * time.Millisecond
	p.SetLatency(d)
	start := time.Now()
	r := bufio.NewReader(c)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	for i := 0; i < 10; i++ {
		_, err := io.WriteString(c, "line\n")
		require.NoError(t, err)
		time.Sleep(5 * time.Millisecond)
	}
	for i := 0; i < 10; i++ {
		got, err := r.ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, "line\n", got)
	}
	took := time.Since(start)
	require.GreaterOrEqual(t, took, 2*d, "a round trip crosses the link twice")
	require.Less(t, took, 2*d+9*5*time.Millisecond+4*d, "pieces sent during a delay are not held up behind it")
	p.SetLatency(0)
	_, err = roundTrip(c, "fast again")
	require.NoError(t, err)
}
