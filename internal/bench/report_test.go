package bench

import (
	"strings"
	"testing"
)

// A partial run keeps the sections and target rows of the benchmarks it did
// not run, and nothing of those it ran.
func TestPartialRunKeepsTheOtherSections(t *testing.T) {
	old := "# Benchmarks\n\nRun with x.\n\n## Machine\n\n| CPU | 2 |\n\n## Targets\n\n| # | target | holds | measured |\n|---|---|---|---|\n" +
		"| 1 | one | no | a |\n| 2 | two | **yes** | b |\n| 3 | three | **yes** | c |\n\n" +
		"## 1. First\n\n| 10 | row |\n\n## 2. Second\n\nkept two\n\n## 3. Third\n\n| 5 | kept three |\n\n" + handWritten + "\n\nby hand\n"
	k := keptSections(old, map[int]bool{1: true})
	if len(k.ids) != 2 || k.ids[0] != 2 || k.ids[1] != 3 {
		t.Fatalf("kept %v, want 2 and 3", k.ids)
	}
	if !strings.Contains(k.sections[2], "kept two") || !strings.Contains(k.sections[3], "| 5 | kept three |") || strings.Contains(k.sections[3], "by hand") {
		t.Fatalf("sections: %v", k.sections)
	}
	if len(k.targetRows) != 2 || !strings.HasPrefix(k.targetRows[0], "| 2 |") || !strings.HasPrefix(k.targetRows[1], "| 3 |") {
		t.Fatalf("target rows: %q", k.targetRows)
	}
	merged := mergeTargets("## Targets\n\n| # | target | holds | measured |\n|---|---|---|---|\n| 1 | new one | **yes** | z |\n", k.targetRows)
	want := "## Targets\n\n| # | target | holds | measured |\n|---|---|---|---|\n| 1 | new one | **yes** | z |\n| 2 | two | **yes** | b |\n| 3 | three | **yes** | c |\n"
	if merged != want {
		t.Fatalf("merged:\n%s\nwant:\n%s", merged, want)
	}
	if all := keptSections(old, nil); len(all.sections) != 0 {
		t.Fatal("a full run keeps nothing")
	}
}
