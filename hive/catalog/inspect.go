package catalog

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"

	parser "github.com/gpustack/gguf-parser-go"

	"github.com/rbee-dev/rbee/internal/gguf"
)

// errTruncated marks a GGUF file that ends before its header or tensors do.
var errTruncated = errors.New("the file is truncated")

// modelInfo is what the catalog records from a GGUF file.
type modelInfo struct {
	architecture        string
	parameters          uint64
	quantization        string
	contextLength       int
	estimatedMemory     uint64
	estimatedForContext int
}

// inspect parses path as GGUF and estimates the memory llama.cpp needs to run
// it on the CPU with nCtx tokens of context (capped at the model's training
// context, beyond which a worker would not run it). The parser panics on some
// malformed files; a panic is reported as the file not being a usable model.
func inspect(path string, nCtx int) (info modelInfo, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("the GGUF parser failed: %v", r)
		}
	}()
	gf, err := parser.ParseGGUFFile(path)
	if err != nil {
		// The parser reports a file cut short as whatever it trips over
		// first ("a tensor type's block layout does not match"); a copy or
		// download that stopped early deserves to be named as such.
		if terr := truncation(path); terr != nil {
			return info, terr
		}
		return info, err
	}
	arch := gf.Architecture()
	if arch.Type != "model" {
		return info, fmt.Errorf("the file is a GGUF %s (%s), not a language model", arch.Type, arch.Architecture)
	}
	if arch.Architecture == "" {
		return info, errors.New("general.architecture is missing")
	}
	// One shard of a split model parses, but llama.cpp needs every shard
	// beside it under its original name, which a catalog entry cannot hold.
	if kv, ok := gf.Header.MetadataKV.Get("split.count"); ok && kv.ValueType.IsNumeric() && parser.ValueNumeric[uint64](kv) > 1 {
		return info, fmt.Errorf("the file is one of %d shards of a split model, which the catalog does not support; merge the shards with llama-gguf-split --merge and add the merged file", parser.ValueNumeric[uint64](kv))
	}
	md := gf.Metadata()
	info.architecture = arch.Architecture
	info.parameters = uint64(md.Parameters)
	info.quantization = md.FileTypeDescriptor
	info.contextLength = int(arch.MaximumContextLength)

	n := nCtx
	if info.contextLength > 0 && info.contextLength < n {
		n = info.contextLength
	}
	est := gf.EstimateLLaMACppRun(
		parser.WithLLaMACppContextSize(int32(n)),
		parser.WithLLaMACppOffloadLayers(0),
	)
	// mmap=false counts the weights as resident, which they are once the
	// model has run a while; RAM is the whole footprint with 0 layers on a GPU.
	sum := est.SummarizeItem(false, 0, 0)
	info.estimatedMemory = uint64(sum.RAM.NonUMA)
	info.estimatedForContext = n
	return info, nil
}

// truncation says whether the GGUF file at path is shorter than its own
// header declares: it ends inside the header, or before the end of the last
// tensor's data. It returns nil when the file is not truncated or when it
// cannot tell (a header it cannot read, a tensor type it does not know, or
// tensors that overlap, which is a malformed file rather than a short one).
func truncation(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil
	}
	size := st.Size()
	l, err := gguf.ReadLayout(bufio.NewReaderSize(f, 1<<16))
	if errors.Is(err, gguf.ErrTruncated) {
		return fmt.Errorf("%w: it is %d bytes and ends inside its header; the copy or download stopped early, so add it again from a complete file", errTruncated, size)
	}
	if err != nil {
		return nil
	}
	type span struct{ off, n uint64 }
	spans := make([]span, 0, len(l.Tensors))
	for _, t := range l.Tensors {
		ti := parser.GGUFTensorInfo{NDimensions: uint32(len(t.Dims)), Dimensions: t.Dims, Type: parser.GGMLType(t.Type)}
		if _, ok := ti.Type.Trait(); !ok {
			return nil
		}
		spans = append(spans, span{t.Offset, ti.Bytes()})
	}
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.off, b.off) })
	var need uint64
	for i, s := range spans {
		if i > 0 && s.off < spans[i-1].off+spans[i-1].n {
			return nil
		}
		need = max(need, s.off+s.n)
	}
	var held uint64
	if size > l.DataStart {
		held = uint64(size - l.DataStart)
	}
	if held >= need {
		return nil
	}
	return fmt.Errorf("%w: expected %d bytes of tensor data after its %d-byte header, the file has %d (it is %d bytes, %d short); the copy or download stopped early, so add it again from a complete file",
		errTruncated, need, l.DataStart, held, size, need-held)
}
