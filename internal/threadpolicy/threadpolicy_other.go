//go:build !linux

package threadpolicy

func background() error { return nil }
func foreground() error { return nil }
