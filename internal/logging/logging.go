// Package logging builds the daemons' operator logs, in one place, so every
// program's log reads the same wherever it ends up.
//
// A daemon's stderr is often a file: the queen and the hive start their
// children with stderr appended to a log (proc.Start), and a hive's error
// quotes that log's tail. So colour is used only when stderr is a terminal,
// and durations are written with their unit ("took=1.25s", not
// "took=1250"), since a bare number in a file does not say what it counts.
package logging

import (
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/term"
)

func init() {
	// zerolog's default is a float of milliseconds with no unit. A string
	// (time.Duration.String) carries its unit in JSON and console lines
	// alike. Set at init, before any logger of this process writes, so
	// there is no race with a logging goroutine.
	zerolog.DurationFieldFormat = zerolog.DurationFormatString
}

// New builds a daemon's logger for component at level (trace, debug, info,
// warn, error; anything else is info). With file set, it appends JSON lines
// to file (creating its directory); otherwise it writes human-readable lines
// to stderr, in colour only when stderr is a terminal and NO_COLOR is unset.
// The returned func closes the file.
func New(level, file, component string) (zerolog.Logger, func(), error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || lvl == zerolog.NoLevel {
		lvl = zerolog.InfoLevel
	}
	var w io.Writer = Console(os.Stderr)
	closeFn := func() {}
	if file != "" {
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			return zerolog.Nop(), closeFn, err
		}
		f, err := os.OpenFile(file, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return zerolog.Nop(), closeFn, err
		}
		w = f
		closeFn = func() { _ = f.Close() }
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Str("component", component).Logger(), closeFn, nil
}

// Console is zerolog's human-readable writer on f, coloured only when f is a
// terminal and NO_COLOR is unset (https://no-color.org).
func Console(f *os.File) zerolog.ConsoleWriter {
	return zerolog.ConsoleWriter{Out: f, TimeFormat: time.TimeOnly, NoColor: !Colour(f)}
}

// Colour says whether escape codes belong on f: only on a terminal, and not
// when the user set NO_COLOR.
func Colour(f *os.File) bool {
	if os.Getenv("NO_COLOR") != "" {
		return false
	}
	return term.IsTerminal(int(f.Fd()))
}
