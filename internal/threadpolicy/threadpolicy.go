// Package threadpolicy keeps rbee's own work from interrupting inference on the
// cores it shares with it.
//
// On one machine the queen (and the bus it embeds), the hive, the keeper
// and a worker's bus traffic run on the cores that decode. Linux lets a
// thread that wakes up take the core from a running one at once, so each
// token's publish, store, ack and delivery, a few wake-ups, interrupted the
// decode about once per token (a worker decoding the tiny test model alone
// was preempted some 6,000 times a second). Marked as batch work, a waking
// thread of rbee runs on an idle core, or when the running thread's slice
// ends, instead of cutting into it; only the threads that decode, and
// llama.cpp's threads they start, stay ordinary. Nothing is reserved or
// raised, so it needs no privilege; every thread keeps its fair share and
// its nice value.
//
// The trade: when every core decodes, a message waits for a slice (about a
// millisecond) instead of preempting at once, while a preempted decode of
// several threads stalls all of them at ggml's barrier.
package threadpolicy

// Background marks every thread of this process, and so every thread it
// starts later (a new thread inherits its creator's policy), as batch work.
// Called first thing by each rbee program. Where the policy cannot be set
// (another OS, a sandbox that forbids it) nothing changes and the error
// says why.
func Background() error { return background() }

// Foreground makes the calling OS thread ordinary again: a thread that
// decodes, locked to its goroutine (runtime.LockOSThread), calls it before
// its first step. The threads llama.cpp starts from it inherit it.
func Foreground() error { return foreground() }
