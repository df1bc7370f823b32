// Package capabilities finds out what hardware a hive's machine has, so the
// scheduler can place LLM workers without asking the hive.
//
// Detect runs once at hive start and fills api.Capabilities. FreeMemory is
// the cheap per-heartbeat refresh of free RAM; GPUFree re-queries nvidia-smi
// for free VRAM and is meant to be called less often, because it spawns a
// process.
//
// GPU detection never stops a hive from starting: a machine without
// nvidia-smi simply has no GPUs, and a machine whose nvidia-smi fails (broken
// driver, hang) reports no GPUs plus a short reason in GPUError, so an
// operator sees why a GPU box is being scheduled as CPU-only.
package capabilities
