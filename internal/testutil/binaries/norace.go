//go:build !race

package binaries

const raceEnabled = false
