package subjects_test

import (
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

func TestValidateID(t *testing.T) {
	cases := []struct {
		id   string
		ok   bool
		want string // part of the error message
	}{
		{"hive-1", true, ""},
		{"A_b-9", true, ""},
		{strings.Repeat("x", 64), true, ""},
		{"", false, "empty"},
		{strings.Repeat("x", 65), false, "limit is 64"},
		{"a.b", false, `'.'`},
		{"x>", false, `'>'`},
		{"*", false, `'*'`},
		{"a b", false, `' '`},
		{"tab\t", false, `'\t'`},
		{"ünï", false, "only A-Z"},
	}
	for _, c := range cases {
		err := subjects.ValidateID(subjects.KindHive, c.id)
		if c.ok {
			require.NoError(t, err, c.id)
			continue
		}
		require.ErrorIs(t, err, subjects.ErrInvalidID, c.id)
		require.Contains(t, err.Error(), "hive id", "the error names the field")
		require.Contains(t, err.Error(), c.want)
	}
}

func TestValidateModelIDAndKey(t *testing.T) {
	for _, bad := range []string{"", "../etc", ".hidden", "a/b", "a..b", "x>", "a b"} {
		require.Error(t, subjects.ValidateModelID(bad), bad)
	}
	k, err := subjects.ModelKey("tiny")
	require.NoError(t, err)
	require.Equal(t, "tiny", k)
	k1, err := subjects.ModelKey("llama-3.2-1b")
	require.NoError(t, err)
	require.NoError(t, subjects.ValidateID(subjects.KindModelKey, k1))
	k2, err := subjects.ModelKey("llama-3_2-1b")
	require.NoError(t, err)
	require.NotEqual(t, k1, k2, "ids differing only in '.' vs '_' get different keys")
	long, err := subjects.ModelKey(strings.Repeat("a.", 32))
	require.NoError(t, err)
	require.NoError(t, subjects.ValidateID(subjects.KindModelKey, long))
}

func TestNamesAndNamespace(t *testing.T) {
	s := subjects.Default()
	ev, err := s.JobEvent("j1", subjects.EventToken)
	require.NoError(t, err)
	require.Equal(t, "rbee.job.j1.token", ev)
	_, err = s.JobEvent("j.1", subjects.EventToken)
	require.Error(t, err)
	h, err := s.Hive("gpu1", "status")
	require.NoError(t, err)
	require.Equal(t, "rbee.hive.gpu1.status", h)
	require.Equal(t, "rbee_hives", s.HivesBucket())
	require.Equal(t, "RBEE_JOBS", s.JobsStream())

	other, err := subjects.New("lab")
	require.NoError(t, err)
	ev2, _ := other.JobEvent("j1", subjects.EventToken)
	require.Equal(t, "lab.job.j1.token", ev2)
	require.Equal(t, "LAB_INFER", other.InferStream())
	for _, bad := range []string{"Lab", "a.b", "x>", strings.Repeat("n", 33)} {
		_, err := subjects.New(bad)
		require.Error(t, err, bad)
	}
	job, kind, ok := s.JobIDFromSubject("rbee.job.abc.state")
	require.True(t, ok)
	require.Equal(t, "abc", job)
	require.Equal(t, subjects.EventState, kind)
}

// FuzzIDsCannotEscapeTheirToken proves that no accepted id changes the shape
// of a subject: the subject built from it has exactly the expected number of
// tokens and no wildcard.
func FuzzIDsCannotEscapeTheirToken(f *testing.F) {
	for _, seed := range []string{"job1", "a.b", "x>", "*", "a b", "", "\x00", "ok-id_2", "..", "a.>"} {
		f.Add(seed)
	}
	s := subjects.Default()
	f.Fuzz(func(t *testing.T, id string) {
		check := func(subject string, tokens int) {
			parts := strings.Split(subject, ".")
			if len(parts) != tokens {
				t.Fatalf("id %q produced %q with %d tokens, want %d", id, subject, len(parts), tokens)
			}
			for _, p := range parts {
				if p == "" || p == "*" || p == ">" || strings.ContainsAny(p, " \t\r\n*>") {
					t.Fatalf("id %q produced bad token %q in %q", id, p, subject)
				}
			}
		}
		if subj, err := s.JobEvent(id, subjects.EventNarration); err == nil {
			check(subj, 4)
		}
		if subj, err := s.JobCancel(id); err == nil {
			check(subj, 4)
		}
		if subj, err := s.Hive(id, "status"); err == nil {
			check(subj, 4)
		}
		if subj, err := s.Worker("h1", id, "status"); err == nil {
			check(subj, 5)
		}
		if subj, err := s.Worker(id, "w1", "status"); err == nil {
			check(subj, 5)
		}
		if subj, err := s.Infer(id); err == nil {
			check(subj, 3)
		}
		if key, err := subjects.ModelKey(id); err == nil {
			subj, err := s.Infer(key)
			if err != nil {
				t.Fatalf("model id %q gave key %q that is not a token: %v", id, key, err)
			}
			check(subj, 3)
		}
	})
}

// TestWildcardsMatchWhatTheyName checks each wildcard of the space against
// the subjects it stands for, with the server's own matching: permissions
// and stream subjects are built from them.
func TestWildcardsMatchWhatTheyName(t *testing.T) {
	s, err := subjects.New("ns")
	require.NoError(t, err)
	matches := func(subject, filter string) bool { return server.SubjectMatchesFilter(subject, filter) }

	for _, kind := range []subjects.EventKind{subjects.EventNarration, subjects.EventToken, subjects.EventState} {
		ev, err := s.JobEvent("job-1", kind)
		require.NoError(t, err)
		require.True(t, matches(ev, s.EveryJob(kind)), "%s by EveryJob(%s)", ev, kind)
		stored := 0
		for _, f := range s.JobsStreamSubjects() {
			if matches(ev, f) {
				stored++
			}
		}
		require.Equal(t, 1, stored, "%s: captured by exactly one of the stream's subjects", ev)
	}
	cancel, err := s.JobCancel("job-1")
	require.NoError(t, err)
	require.True(t, matches(cancel, s.EveryJobCancel()))
	for _, f := range s.JobsStreamSubjects() {
		require.False(t, matches(cancel, f), "a cancel is a live signal, never stored (%s)", f)
	}

	ep, err := s.Hive("h1", "status")
	require.NoError(t, err)
	require.True(t, matches(ep, s.EveryHive("status")))
	require.False(t, matches(ep, s.EveryHive("models")))

	w, err := s.Worker("h1", "w1", "status")
	require.NoError(t, err)
	own, err := s.HiveWorkers("h1")
	require.NoError(t, err)
	other, err := s.HiveWorkers("h2")
	require.NoError(t, err)
	require.True(t, matches(w, own), "a hive's workers' endpoints")
	require.False(t, matches(w, other), "another hive's workers")
	_, err = s.HiveWorkers("a.b")
	require.Error(t, err, "a hive id that would widen the wildcard")
}
