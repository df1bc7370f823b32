//go:build !linux

package sched

func background() error { return nil }
func foreground() error { return nil }
