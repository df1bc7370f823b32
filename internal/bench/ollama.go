package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Ollama is the peer issue 11 names: "Ollama's figures are the peer to
// beat at every row". Where an `ollama` program is installed, tables 1
// and 8 add its rows beside rbee's: the same generated models (its copy of
// the same file), the same prompts and client code, interleaved in the
// same rounds, so the comparison is of one run on one machine. Nothing
// of rbee depends on it, and the tables say when it is missing.

// errNoOllama is a machine without an ollama program.
var errNoOllama = errors.New("no `ollama` program on PATH")

// peer is an ollama server the bench started.
type peer struct {
	// base is its HTTP address (http://127.0.0.1:port).
	base    string
	version string
	proc    *process
}

// peerModel is one model the peer serves, under the bench's own name.
type peerModel struct {
	name, path string
	ctx        int
	// threads, when not 0, is its num_thread; 0 leaves Ollama's choice.
	threads int
}

// startPeer starts `ollama serve` on a port of its own, with its store in
// the bench's temp root, parallel requests per model, and every model kept
// loaded; then creates models from their files.
func (e *env) startPeer(ctx context.Context, parallel int, models []peerModel, extraEnv ...string) (*peer, error) {
	bin, err := exec.LookPath("ollama")
	if err != nil {
		return nil, errNoOllama
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir := e.dir("ollama")
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	env := []string{
		"OLLAMA_HOST=" + addr, "OLLAMA_MODELS=" + filepath.Join(dir, "models"), "HOME=" + dir,
		fmt.Sprintf("OLLAMA_NUM_PARALLEL=%d", parallel), fmt.Sprintf("OLLAMA_MAX_LOADED_MODELS=%d", len(models)),
		"OLLAMA_KEEP_ALIVE=-1", "OLLAMA_NOPRUNE=1",
	}
	env = append(env, extraEnv...)
	p, err := e.procs.start("ollama", bin, []string{"serve"}, env, filepath.Join(dir, "serve.log"))
	if err != nil {
		return nil, err
	}
	pr := &peer{base: "http://" + addr, proc: p}
	ready := waitFor(ctx, 30*time.Second, 50*time.Millisecond, func() bool {
		var v struct {
			Version string `json:"version"`
		}
		if getJSON(ctx, pr.base+"/api/version", &v) != nil {
			return false
		}
		pr.version = v.Version
		return true
	})
	if !ready {
		return nil, fmt.Errorf("ollama serve did not answer within 30s: %s", logTail(p))
	}
	for _, m := range models {
		// Ollama serves a model from a copy in its blob store. Two copies
		// of one file can decode at different speeds on a VM (table 8's
		// note), so the blob is made a hard link to the file the other
		// ways read: its create then finds the blob there and copies
		// nothing. Where no link can be made, it copies.
		if err := linkBlob(filepath.Join(dir, "models", "blobs"), m.path); err != nil {
			e.logf("ollama: %s is read from a copy: %v", m.name, err)
		}
		mf := fmt.Sprintf("FROM %s\nPARAMETER num_ctx %d\n", m.path, m.ctx)
		if m.threads > 0 {
			mf += fmt.Sprintf("PARAMETER num_thread %d\n", m.threads)
		}
		path := filepath.Join(dir, m.name+".Modelfile")
		if err := os.WriteFile(path, []byte(mf), 0o644); err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, bin, "create", m.name, "-f", path)
		cmd.Env = childEnv(env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ollama create %s: %v: %s", m.name, err, lastLine(out))
		}
	}
	return pr, nil
}

// linkBlob hard-links file into an Ollama blob store under its digest.
func linkBlob(blobs, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	return os.Link(file, filepath.Join(blobs, "sha256-"+hex.EncodeToString(h.Sum(nil))))
}

func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

func getJSON(ctx context.Context, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

var httpClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}}

// streamCompletion posts an OpenAI completions request with stream: true to
// base (rbee's gateway or Ollama's) and reads its server-sent events: the
// arrival time of every chunk that carries a token, and their text.
func streamCompletion(ctx context.Context, base string, body map[string]any) (t0 time.Time, arrivals []time.Time, text string, err error) {
	body["stream"] = true
	data, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", bytes.NewReader(data))
	if err != nil {
		return t0, nil, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	t0 = time.Now()
	resp, err := httpClient.Do(req)
	if err != nil {
		return t0, nil, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		return t0, nil, "", fmt.Errorf("%s answered %d: %s", base, resp.StatusCode, strings.TrimSpace(b.String()))
	}
	var sb strings.Builder
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			break
		}
		var chunk struct {
			Choices []struct {
				Text         string  `json:"text"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
			Error json.RawMessage `json:"error"`
		}
		if err := json.Unmarshal([]byte(line), &chunk); err != nil {
			return t0, nil, "", fmt.Errorf("bad SSE chunk %q: %w", line, err)
		}
		if len(chunk.Error) > 0 {
			return t0, nil, "", fmt.Errorf("stream error: %s", chunk.Error)
		}
		// A chunk with a finish reason ends the stream; one without
		// carries a token (Ollama also sends its last token's text with
		// the finish reason: counted, with no arrival of its own).
		if len(chunk.Choices) > 0 {
			sb.WriteString(chunk.Choices[0].Text)
			if chunk.Choices[0].FinishReason == nil {
				arrivals = append(arrivals, time.Now())
			}
		}
	}
	if err := sc.Err(); err != nil {
		return t0, nil, "", err
	}
	return t0, arrivals, sb.String(), nil
}

// curlTTFT is an outside client's time to first token: curl on a
// connection of its own, its time to the response's first byte. Both
// rbee's gateway and Ollama's send their headers with the first token.
func curlTTFT(ctx context.Context, base string, body map[string]any) (time.Duration, error) {
	body["stream"] = true
	data, _ := json.Marshal(body)
	out, err := exec.CommandContext(ctx, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer}",
		"-H", "Content-Type: application/json", "--data-binary", string(data), base+"/v1/completions").Output()
	if err != nil {
		return 0, fmt.Errorf("curl: %w", err)
	}
	var code int
	var first float64
	if _, err := fmt.Sscanf(string(out), "%d %g", &code, &first); err != nil || code != http.StatusOK {
		return 0, fmt.Errorf("curl: %q", out)
	}
	return time.Duration(first * float64(time.Second)), nil
}
