package testenv

import "testing"

func TestPersonalSettingsAreEveryRBEEVariableButTheTestKnobs(t *testing.T) {
	for name, want := range map[string]bool{
		"RBEE_CREDS":          true,
		"RBEE_API_KEY":        true,
		"RBEE_HOME":           true,
		"RBEE_NATS_URL":       true,
		"RBEE_JOB_TIMEOUT":    true,
		"RBEE_LLAMA_LIB":      false,
		"RBEE_RACE_BINARIES":  false,
		"RBEE_CHAOS_SEED":     false,
		"RBEE_CHAOS_DURATION": false,
		"PATH":                false,
		"XRBEE_CREDS":         false,
	} {
		if got := Personal(name); got != want {
			t.Errorf("Personal(%q) = %v, want %v", name, got, want)
		}
	}
}
