package hive_test

import (
	"testing"

	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

// A hive answers its longest requests (a model download, a worker's drain
// with a long grace) when they are done; the bus lets an answer through
// only for a while after its request, and that while must cover them.
func TestTheBusLetsAHiveAnswerItsLongestRequests(t *testing.T) {
	p := auth.Permissions(subjects.Default(), auth.Principal{Role: auth.RoleHive, Hive: "h1"}, "UKEY")
	require.NotNil(t, p.Response)
	require.GreaterOrEqual(t, p.Response.Expires, hive.LongRequestTimeout)
}
