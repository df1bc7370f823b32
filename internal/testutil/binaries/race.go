//go:build race

package binaries

const raceEnabled = true
