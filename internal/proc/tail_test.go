package proc

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestTailIsPlainText checks that Tail's lines, which end up in errors and
// JSON fields, carry no terminal escape sequences even when the log does
// (a log appended to by an older, colouring build).
func TestTailIsPlainText(t *testing.T) {
	log := "" +
		"\x1b[90m10:00:00\x1b[0m \x1b[32mINF\x1b[0m hive online \x1b[36mheartbeat=\x1b[0m5s\n" +
		"\x1b[90m10:00:01\x1b[0m \x1b[31mERR\x1b[0m worker exited \x1b[36mexit=\x1b[0m1\n" +
		"a lone \x1b escape\n"
	path := filepath.Join(t.TempDir(), "w.log")
	if err := os.WriteFile(path, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	got := Tail(path, 2)
	want := "10:00:01 ERR worker exited exit=1\na lone  escape"
	if got != want {
		t.Fatalf("Tail = %q, want %q", got, want)
	}
	if strings.ContainsRune(Tail(path, 10), 0x1b) {
		t.Fatalf("Tail kept an ESC byte: %q", Tail(path, 10))
	}
}
