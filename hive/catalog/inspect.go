package catalog

import (
	"errors"
	"fmt"

	parser "github.com/gpustack/gguf-parser-go"
)

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
