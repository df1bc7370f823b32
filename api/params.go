package api

import (
	"fmt"
	"strings"
)

// The one set of rules for sampling and length parameters. The queen checks
// them at admission, so a bad request never becomes a job; the worker's
// engine checks them again against its model's context (defence in depth).
// Both call Problem, so the two checks cannot drift apart.

// MaxRepeatPenalty bounds RepeatPenalty: above it every recent token is
// already impossible, and an infinite one breaks the sampler.
const MaxRepeatPenalty = 1e6

// Problem returns the first parameter out of range and why, or "", "".
// contextSize is the context the request will run in, in tokens; 0 when it
// is not known yet (at admission), which leaves max_tokens bounded below
// only. MaxTokens 0 means the worker's default.
func (s Sampling) Problem(contextSize int) (param, why string) {
	switch {
	case s.MaxTokens < 0:
		return "max_tokens", fmt.Sprintf("must be at least 1, got %d", s.MaxTokens)
	case contextSize > 0 && s.MaxTokens > contextSize:
		return "max_tokens", fmt.Sprintf("must be between 1 and %d (the model's context), got %d", contextSize, s.MaxTokens)
	case !(s.Temperature >= 0 && s.Temperature <= 2):
		return "temperature", fmt.Sprintf("must be between 0 and 2, got %g", s.Temperature)
	case !(s.TopP >= 0 && s.TopP <= 1):
		return "top_p", fmt.Sprintf("must be between 0 and 1, got %g", s.TopP)
	case s.TopK < 0:
		return "top_k", fmt.Sprintf("must be 0 (off) or more, got %d", s.TopK)
	case !(s.MinP >= 0 && s.MinP <= 1):
		return "min_p", fmt.Sprintf("must be between 0 and 1, got %g", s.MinP)
	case !(s.RepeatPenalty >= 0 && s.RepeatPenalty <= MaxRepeatPenalty):
		return "repeat_penalty", fmt.Sprintf("must be between 0 and %g, got %g", float64(MaxRepeatPenalty), s.RepeatPenalty)
	}
	for i, stop := range s.Stop {
		if stop == "" {
			return "stop", fmt.Sprintf("entry %d is empty; a stop sequence needs at least one character", i)
		}
	}
	return "", ""
}

// Validate is Problem as an *Error of reason invalid_param, or nil.
func (s Sampling) Validate(contextSize int) *Error {
	if param, why := s.Problem(contextSize); param != "" {
		return InvalidParam(param, "%s", why)
	}
	return nil
}

// ValidatePrompt checks the prompt, system text and messages as far as they
// can be checked without the model: something to answer, roles named, and
// no NUL byte (llama.cpp reads text as C strings, so a NUL would cut the
// prompt short without a word).
func (a InferArgs) ValidatePrompt() *Error {
	if strings.TrimSpace(a.Prompt) == "" && len(a.Messages) == 0 {
		return InvalidParam("prompt", "it is empty")
	}
	if strings.IndexByte(a.Prompt, 0) >= 0 {
		return InvalidParam("prompt", "it contains a NUL byte")
	}
	if strings.IndexByte(a.System, 0) >= 0 {
		return InvalidParam("system", "it contains a NUL byte")
	}
	for i, m := range a.Messages {
		if strings.TrimSpace(m.Role) == "" {
			return InvalidParam(fmt.Sprintf("messages[%d].role", i), "message %d has no role", i)
		}
		if strings.IndexByte(m.Role, 0) >= 0 {
			return InvalidParam(fmt.Sprintf("messages[%d].role", i), "it contains a NUL byte")
		}
		if strings.IndexByte(m.Content, 0) >= 0 {
			return InvalidParam(fmt.Sprintf("messages[%d].content", i), "message %d contains a NUL byte", i)
		}
	}
	return nil
}
