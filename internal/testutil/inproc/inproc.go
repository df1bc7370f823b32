// Package inproc runs a daemon's Run function in the test process, as the
// hive and worker unit tests do: started, awaited until it serves, and
// stopped with the test.
package inproc

import (
	"context"
	"testing"
	"time"
)

// Daemon is a Run function running in a goroutine of the test.
type Daemon struct {
	name   string
	Cancel context.CancelFunc
	done   chan error
}

// Start runs run until the test ends and waits for the first value on
// ready, failing the test if run returns first or none comes within
// readyWithin. At cleanup it cancels run and waits up to 30 s for it.
func Start[T any](t testing.TB, name string, run func(context.Context) error, ready <-chan T, readyWithin time.Duration) (*Daemon, T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &Daemon{name: name, Cancel: cancel, done: make(chan error, 1)}
	go func() { d.done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-d.done:
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not stop within 30s", name)
		}
	})
	var v T
	select {
	case v = <-ready:
	case err := <-d.done:
		d.done <- err // for the cleanup, which would wait for it
		t.Fatalf("%s stopped before it was ready: %v", name, err)
	case <-time.After(readyWithin):
		t.Fatalf("%s not ready within %s", name, readyWithin)
	}
	return d, v
}

// Wait returns run's result, failing the test if it takes longer than
// within. Later waits, the cleanup's included, see the same result.
func (d *Daemon) Wait(t testing.TB, within time.Duration) error {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(within):
		t.Fatalf("%s did not stop within %s", d.name, within)
		return nil
	}
}
