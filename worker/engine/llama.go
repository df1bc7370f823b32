package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"
	parser "github.com/gpustack/gguf-parser-go"
	"github.com/hybridgroup/yzma/pkg/llama"

	"github.com/rbee-dev/rbee/internal/llamalib"
)

// LogEnvVar, when set to 1, passes llama.cpp's log to stderr instead of
// silencing it (load errors are still captured for error messages).
const LogEnvVar = "RBEE_LLAMA_LOG"

// Process-wide llama.cpp state: yzma binds the libraries into package
// globals, so they are loaded and initialised once per process.
var (
	backendOnce sync.Once
	backendDir  string
	backendErr  error

	// loadMu serialises model loads, so that log lines captured during a
	// load belong to it.
	loadMu sync.Mutex

	logMu      sync.Mutex
	logCapture *strings.Builder
	logEcho    bool
)

// Llama is the llama.cpp engine (through github.com/hybridgroup/yzma).
type Llama struct {
	libDir string
}

var _ Engine = (*Llama)(nil)

// NewLlama loads the llama.cpp shared libraries from libDir, or from the
// directory llamalib.Find("") picks when libDir is empty, and initialises the
// backend. The libraries are loaded once per process: a later call with
// another directory fails with ErrLibrary.
func NewLlama(libDir string) (*Llama, error) {
	dir, err := llamalib.Find(libDir)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLibrary, err)
	}
	backendOnce.Do(func() {
		backendDir = dir
		backendErr = initBackend(dir)
	})
	if backendErr != nil {
		return nil, backendErr
	}
	if dir != backendDir {
		return nil, fmt.Errorf("%w: already loaded from %s, cannot also load %s", ErrLibrary, backendDir, dir)
	}
	return &Llama{libDir: dir}, nil
}

// LibDir is the directory the libraries were loaded from.
func (l *Llama) LibDir() string { return l.libDir }

func initBackend(dir string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: loading from %s: %v", ErrLibrary, dir, r)
		}
	}()
	if err := llama.Load(dir); err != nil {
		return fmt.Errorf("%w: loading from %s: %w", ErrLibrary, dir, err)
	}
	logEcho = os.Getenv(LogEnvVar) == "1"
	// One callback for the life of the process: purego callbacks are never
	// freed. It must be set before Init, which logs the backends it loads.
	llama.LogSet(purego.NewCallback(logCallback))
	llama.Init()
	return nil
}

// logCallback receives llama.cpp and ggml log lines (ggml_log_callback).
func logCallback(level int32, text unsafe.Pointer, _ unsafe.Pointer) uintptr {
	if text == nil {
		return 0
	}
	msg := cString(text)
	logMu.Lock()
	defer logMu.Unlock()
	if logCapture != nil && (llama.LogLevel(level) == llama.LogLevelError || llama.LogLevel(level) == llama.LogLevelWarn) {
		logCapture.WriteString(msg)
	}
	if logEcho {
		fmt.Fprint(os.Stderr, msg)
	}
	return 0
}

func cString(p unsafe.Pointer) string {
	n := 0
	for *(*byte)(unsafe.Add(p, n)) != 0 {
		n++
	}
	return string(unsafe.Slice((*byte)(p), n))
}

// captureLog records warnings and errors logged until the returned function
// is called; it returns them.
func captureLog() func() string {
	var b strings.Builder
	logMu.Lock()
	logCapture = &b
	logMu.Unlock()
	return func() string {
		logMu.Lock()
		logCapture = nil
		logMu.Unlock()
		return strings.TrimSpace(b.String())
	}
}

// Load implements Engine.
func (l *Llama) Load(ctx context.Context, path string, opts LoadOptions) (Model, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrLoad, path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLoad, err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("%w %s: is a directory", ErrLoad, path)
	}
	if err := checkGGUF(path, st.Size()); err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrLoad, path, err)
	}
	if opts.ContextSize < 0 || opts.Threads < 0 || opts.Slots < 0 || opts.Lanes < 0 {
		return nil, fmt.Errorf("%w: context size %d, threads %d, slots %d and lanes %d must not be negative",
			ErrLoad, opts.ContextSize, opts.Threads, opts.Slots, opts.Lanes)
	}
	if opts.Slots > MaxSlots {
		return nil, fmt.Errorf("%w: %d slots: at most %d", ErrLoad, opts.Slots, MaxSlots)
	}

	mp := llama.ModelDefaultParams()
	if err := setDevice(&mp, opts); err != nil {
		return nil, err
	}
	if opts.Resident && isCPU(opts.Device) {
		mp.LoadMode = llama.LoadModeNone // read, not mapped
	}

	loadMu.Lock()
	done := captureLog()
	handle, err := llama.ModelLoadFromFile(path, mp)
	logged := done()
	loadMu.Unlock()
	if err != nil || handle == 0 {
		reason := "llama.cpp could not load it"
		if logged != "" {
			reason += ": " + strings.ReplaceAll(logged, "\n", "; ")
		}
		return nil, fmt.Errorf("%w %s: %s", ErrLoad, path, reason)
	}

	m := &llamaModel{
		handle: handle,
		vocab:  llama.ModelGetVocab(handle),
		path:   path,
		slots:  map[*llamaSlot]struct{}{},
	}
	m.nVocab = llama.VocabNTokens(m.vocab)
	m.ctxSize = opts.ContextSize
	if m.ctxSize == 0 {
		m.ctxSize = int(llama.ModelNCtxTrain(handle))
	}
	if m.ctxSize <= 0 {
		m.ctxSize = 4096
	}
	threads := opts.Threads
	if threads == 0 {
		threads = int(llama.Threads())
	}
	if err := m.startLanes(max(opts.Slots, 1), max(opts.Lanes, 1), threads); err != nil {
		_ = llama.ModelFree(handle)
		return nil, fmt.Errorf("%w %s: %w", ErrLoad, path, err)
	}
	return m, nil
}

// checkGGUF parses the header with a pure-Go parser before llama.cpp sees the
// file, so that truncated or garbage files give a clear reason and never
// reach code that could abort the process.
func checkGGUF(path string, size int64) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("not a valid GGUF file: %v", r)
		}
	}()
	if size < 24 {
		return fmt.Errorf("not a GGUF file: only %d bytes", size)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	magic := make([]byte, 4)
	_, err = f.ReadAt(magic, 0)
	_ = f.Close()
	if err != nil {
		return err
	}
	if string(magic) != "GGUF" {
		return fmt.Errorf("not a GGUF file: magic %q", magic)
	}
	gf, err := parser.ParseGGUFFile(path, parser.SkipLargeMetadata())
	if err != nil {
		return fmt.Errorf("not a valid GGUF file: %w", err)
	}
	if len(gf.TensorInfos) == 0 {
		return errors.New("not a model: no tensors")
	}
	end := uint64(gf.TensorDataStartOffset)
	for _, ti := range gf.TensorInfos {
		if e := uint64(gf.TensorDataStartOffset) + ti.Offset + ti.Bytes(); e > end {
			end = e
		}
	}
	if end > uint64(size) {
		return fmt.Errorf("truncated: tensor data ends at byte %d but the file has %d bytes", end, size)
	}
	return nil
}

// isCPU says whether device names the CPU.
func isCPU(device string) bool {
	dev := strings.ToLower(strings.TrimSpace(device))
	return dev == "" || dev == "cpu"
}

func setDevice(mp *llama.ModelParams, opts LoadOptions) error {
	dev := strings.ToLower(strings.TrimSpace(opts.Device))
	if isCPU(dev) {
		mp.SetCPUOnly()
		return nil
	}
	idxStr, ok := strings.CutPrefix(dev, "cuda:")
	if !ok {
		idxStr, ok = strings.CutPrefix(dev, "gpu:")
	}
	idx, err := strconv.Atoi(idxStr)
	if !ok || err != nil || idx < 0 {
		return fmt.Errorf("%w %q: want \"cpu\" or \"cuda:N\"", ErrDevice, opts.Device)
	}
	var gpus []llama.GGMLBackendDevice
	for i := uint64(0); i < llama.GGMLBackendDeviceCount(); i++ {
		d := llama.GGMLBackendDeviceGet(i)
		if t := llama.GGMLBackendDevType(d); t == llama.GGMLBackendDeviceTypeGPU || t == llama.GGMLBackendDeviceTypeIGPU {
			gpus = append(gpus, d)
		}
	}
	if idx >= len(gpus) {
		return fmt.Errorf("%w %q: %d GPU devices in the loaded llama.cpp libraries (is it the CUDA build?)", ErrDevice, opts.Device, len(gpus))
	}
	if err := mp.SetDevices([]llama.GGMLBackendDevice{gpus[idx]}); err != nil {
		return fmt.Errorf("%w %q: %w", ErrDevice, opts.Device, err)
	}
	mp.NGpuLayers = int32(opts.GPULayers)
	if opts.GPULayers <= 0 {
		mp.NGpuLayers = 999
	}
	return nil
}

type llamaModel struct {
	handle  llama.Model
	vocab   llama.Vocab
	nVocab  int32
	path    string
	ctxSize int

	lanes []*lane
	// seqs holds one token per sequence running or waiting for its
	// lane: a Generate beyond the model's slot count waits here.
	seqs chan struct{}
	// pickMu makes choosing a lane and taking a place in it one step.
	pickMu sync.Mutex

	// mu guards closed and slots; Tokenize and ApplyChatTemplate hold it
	// for reading so that Close cannot free the model under them.
	mu     sync.RWMutex
	closed bool
	slots  map[*llamaSlot]struct{}
}

func (m *llamaModel) ContextSize() int { return m.ctxSize }

// Slots is how many sequences the model generates at once.
func (m *llamaModel) Slots() int { return cap(m.seqs) }

// startLanes makes the contexts: slots sequences spread over lanes
// contexts of threads threads each.
func (m *llamaModel) startLanes(slots, lanes, threads int) error {
	lanes = max(1, min(lanes, slots))
	m.seqs = make(chan struct{}, slots)
	for i := range lanes {
		// Each lane holds its share of the slots (rounded up for the
		// first ones); pickLane places a sequence only where there is
		// room.
		n := slots / lanes
		if i < slots%lanes {
			n++
		}
		l, err := newLane(m, n, threads)
		if err != nil {
			for _, l := range m.lanes {
				l.close()
			}
			m.lanes = nil
			return err
		}
		m.lanes = append(m.lanes, l)
	}
	return nil
}

func (m *llamaModel) NewSlot() (Slot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("model %s: %w", m.path, ErrClosed)
	}
	s := &llamaSlot{m: m}
	m.slots[s] = struct{}{}
	return s, nil
}

func (m *llamaModel) Tokenize(text string, addSpecial bool) ([]int32, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return nil, fmt.Errorf("model %s: %w", m.path, ErrClosed)
	}
	if strings.IndexByte(text, 0) >= 0 {
		// yzma would pass a nil C string to llama.cpp.
		return nil, paramErr("text", "must not contain a NUL byte")
	}
	return m.tokenize(text, addSpecial), nil
}

func (m *llamaModel) tokenize(text string, addSpecial bool) []int32 {
	toks := llama.Tokenize(m.vocab, text, addSpecial, true)
	out := make([]int32, len(toks))
	for i, t := range toks {
		out[i] = int32(t)
	}
	return out
}

func (m *llamaModel) ApplyChatTemplate(msgs []ChatMessage, addAssistant bool) (string, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return "", fmt.Errorf("model %s: %w", m.path, ErrClosed)
	}
	tmpl := llama.ModelChatTemplate(m.handle, "")
	if tmpl == "" {
		return "", ErrNoChatTemplate
	}
	if len(msgs) == 0 {
		return "", fmt.Errorf("%w: no messages", ErrChatTemplate)
	}
	chat := make([]llama.ChatMessage, len(msgs))
	size := 256
	for i, msg := range msgs {
		if strings.IndexByte(msg.Role, 0) >= 0 || strings.IndexByte(msg.Content, 0) >= 0 {
			return "", fmt.Errorf("%w: message %d contains a NUL byte", ErrChatTemplate, i)
		}
		chat[i] = llama.NewChatMessage(msg.Role, msg.Content)
		size += 2*(len(msg.Role)+len(msg.Content)) + 64
	}
	for range 3 {
		buf := make([]byte, size)
		n := int(llama.ChatApplyTemplate(tmpl, chat, addAssistant, buf))
		runtime.KeepAlive(chat)
		switch {
		case n < 0:
			return "", fmt.Errorf("%w: llama.cpp does not support the model's template", ErrChatTemplate)
		case n <= len(buf):
			return string(buf[:n]), nil
		}
		size = n
	}
	return "", fmt.Errorf("%w: output keeps growing", ErrChatTemplate)
}

func (m *llamaModel) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	slots := make([]*llamaSlot, 0, len(m.slots))
	for s := range m.slots {
		slots = append(slots, s)
	}
	m.mu.Unlock()
	for _, s := range slots {
		_ = s.Close()
	}
	for _, l := range m.lanes {
		l.close()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return llama.ModelFree(m.handle)
}

// llamaSlot is a handle on the model's sequences: one request at a time.
type llamaSlot struct {
	m *llamaModel

	mu     sync.Mutex // held while generating or closing
	closed bool
}

func (s *llamaSlot) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.m.mu.Lock()
	delete(s.m.slots, s)
	s.m.mu.Unlock()
	return nil
}

// newSampler builds the sampler chain of a request.
func (m *llamaModel) newSampler(req Request) llama.Sampler {
	chain := llama.SamplerChainInit(llama.SamplerChainDefaultParams())
	if req.RepeatPenalty > 0 && req.RepeatPenalty != 1 {
		llama.SamplerChainAdd(chain, llama.SamplerInitPenalties(m.nVocab, 64, req.RepeatPenalty, 0, 0))
	}
	if req.Temperature == 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitGreedy())
		return chain
	}
	if req.TopK > 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitTopK(int32(req.TopK)))
	}
	if req.TopP > 0 && req.TopP < 1 {
		llama.SamplerChainAdd(chain, llama.SamplerInitTopP(req.TopP, 1))
	}
	if req.MinP > 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitMinP(req.MinP, 1))
	}
	llama.SamplerChainAdd(chain, llama.SamplerInitTemp(req.Temperature))
	llama.SamplerChainAdd(chain, llama.SamplerInitDist(req.Seed))
	return chain
}

// piece is the text of tok, in *buf (grown when too small).
func (m *llamaModel) piece(tok llama.Token, buf *[]byte) []byte {
	n := llama.TokenToPiece(m.vocab, tok, *buf, 0, false)
	if n < 0 {
		*buf = make([]byte, -n)
		n = llama.TokenToPiece(m.vocab, tok, *buf, 0, false)
	}
	if n <= 0 {
		return nil
	}
	return (*buf)[:n]
}

func (s *llamaSlot) Generate(ctx context.Context, req Request, onToken func(Token) error) (res Result, err error) {
	start := time.Now()
	defer func() { res.Duration = time.Since(start) }()
	if !s.mu.TryLock() {
		return Result{StopReason: StopError}, ErrSlotBusy
	}
	defer s.mu.Unlock()
	m := s.m
	m.mu.RLock()
	closed := s.closed || m.closed
	m.mu.RUnlock()
	if closed {
		return Result{StopReason: StopError}, fmt.Errorf("slot: %w", ErrClosed)
	}
	if err := req.Validate(m.ctxSize); err != nil {
		return Result{StopReason: StopError}, err
	}
	if onToken == nil {
		onToken = func(Token) error { return nil }
	}
	prompt, err := m.Tokenize(req.Prompt, true)
	if err != nil {
		return Result{StopReason: StopError}, err
	}
	res.PromptTokens = len(prompt)
	if len(prompt) == 0 {
		return Result{StopReason: StopError}, paramErr("prompt", "tokenises to nothing")
	}
	if len(prompt) >= m.ctxSize {
		return Result{StopReason: StopError, PromptTokens: len(prompt)}, &ParamError{Field: "prompt",
			Reason: fmt.Sprintf("%d tokens do not fit in the context of %d", len(prompt), m.ctxSize), Err: ErrPromptTooLong}
	}
	if ctx.Err() != nil {
		res.StopReason = StopCancelled
		return res, nil
	}
	seq := &sequence{req: req, start: start, sampler: m.newSampler(req), notify: make(chan struct{}, 1)}
	seq.prompt = make([]llama.Token, len(prompt))
	for i, t := range prompt {
		seq.prompt[i] = llama.Token(t)
	}
	err = m.run(ctx, seq, onToken, &res)
	return res, err
}
