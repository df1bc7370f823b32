package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// externalBus runs a nats-server with JetStream in the test process on the
// cluster's bus port, as a NATS deployment of its own that the queen, the
// hive and the worker all connect to (`--nats URL`).
type externalBus struct {
	t    *testing.T
	dir  string
	addr string
	srv  *bus.Server
}

func (c *cluster) startExternalBus() *externalBus {
	c.t.Helper()
	e := &externalBus{t: c.t, dir: c.t.TempDir(), addr: fmt.Sprintf("127.0.0.1:%d", c.port)}
	e.start()
	c.t.Cleanup(e.stop)
	return e
}

func (e *externalBus) start() {
	e.t.Helper()
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: e.dir, Listen: e.addr, ServerName: "external", Log: zerolog.Nop()})
	require.NoError(e.t, err)
	e.srv = srv
}

func (e *externalBus) stop() {
	if e.srv != nil {
		e.srv.Shutdown()
		e.srv = nil
	}
}

// A NATS server that every program uses goes away for longer than the
// heartbeat TTL and comes back with its store: the queen, hive and worker
// reconnect, the queen judges liveness only after a grace, and both an
// OpenAI client's SSE stream and the keeper's stream go on to the end with
// the same text as without the outage.
func TestExternalBusOutageIsRiddenOutByEveryStream(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.env = append(c.env, "RBEE_NATS_URL="+c.url())
	nats := c.startExternalBus()
	queen := exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", c.home, "--nats", c.url(), "--gateway", c.gateway)
	queen.Env = c.env
	require.NoError(t, queen.Start())
	t.Cleanup(func() { _ = queen.Process.Kill(); _ = queen.Wait() })
	eventually(t, 20*time.Second, func() bool { return c.rbee("status").code == 0 }, "the queen did not answer on the external bus")
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	c.mustRbee("model", "synth", "--hive", "local", "--size", "large", "large")
	c.mustRbee("worker", "spawn", "--hive", "local", "-m", "large", "--slots", "2")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	body := fmt.Sprintf(`{"model":"large","stream":true,"temperature":0,"max_tokens":%d,"prompt":%q}`, longTokens, longPrompt)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+c.gateway+"/v1/completions", strings.NewReader(body))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	gatewayJob := resp.Header.Get("X-Rbee-Job")
	k := c.start(longInfer()...)

	sse := bufio.NewReader(resp.Body)
	var sseText strings.Builder
	readChunk := func() (done bool) {
		line, err := sse.ReadString('\n')
		require.NoError(t, err, "the SSE stream broke: %s", sseText.String())
		data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: ")
		if !ok {
			return false
		}
		if data == "[DONE]" {
			return true
		}
		var chunk struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		require.NoError(t, json.Unmarshal([]byte(data), &chunk), data)
		require.Nil(t, chunk.Error, "the stream ended in an error")
		for _, ch := range chunk.Choices {
			sseText.WriteString(ch.Text)
		}
		return false
	}
	for sseText.Len() == 0 {
		readChunk()
	}
	eventually(t, 60*time.Second, func() bool { return k.stdout.String() != "" }, "the keeper got no token")

	// Longer than the 3 s heartbeat TTL: every entry expires while the
	// server is away.
	nats.stop()
	time.Sleep(5 * time.Second)
	nats.start()

	for !readChunk() {
	}
	require.Equal(t, 0, k.wait(t, 2*time.Minute), k.stderr.String())
	keeperJob := k.jobID(t)
	for _, id := range []string{gatewayJob, keeperJob} {
		j := c.job(id)
		require.Equal(t, api.JobCompleted, j.State, "%s: %s", id, j.Error)
		require.Equal(t, 1, j.Attempts, "%s ran once, on the worker that lived", id)
		var res api.InferResult
		require.NoError(t, json.Unmarshal(j.Result, &res))
		require.Equal(t, longTokens, res.CompletionTokens)
		if id == gatewayJob {
			require.Equal(t, longGreedy.text, sseText.String(), "the SSE client's answer equals a run with no outage")
		} else {
			require.Equal(t, longGreedy.text+"\n", k.stdout.String(), "the keeper's answer equals a run with no outage")
		}
	}
	require.Contains(t, k.stderr.String(), "lost the bus")
}
