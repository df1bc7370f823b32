package hive_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/stretchr/testify/require"
)

// TestServiceInfoHasVersion checks what `nats micro list` shows for a hive:
// its service answers discovery with the rbee version.
func TestServiceInfoHasVersion(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	startHive(t, fix, "ver", nil)
	subject, err := micro.ControlSubject(micro.InfoVerb, fix.Bus.Space.HiveService(), "")
	require.NoError(t, err)
	msg, err := fix.Bus.NC.Request(subject, nil, 5*time.Second)
	require.NoError(t, err)
	var info micro.Info
	require.NoError(t, json.Unmarshal(msg.Data, &info))
	require.Equal(t, fix.Bus.Space.HiveService(), info.Name)
	require.NotEmpty(t, version.Version)
	require.Equal(t, version.Version, info.Version)
}
