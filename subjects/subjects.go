// Package subjects is the contract of the rbee bus: every subject, stream,
// consumer and KV bucket name is built here and nowhere else.
//
// Ids that become subject tokens (job, hive, worker and model keys) are
// validated before they reach a subject. A token with '.', '*', '>', spaces
// or control characters would let a caller address subjects it does not own
// (subject injection), so such ids are rejected with an error that names the
// field and the rule.
package subjects

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// DefaultNamespace is the first token of every subject and the prefix of every
// stream and bucket name unless a cluster chooses another one, so two rbee
// clusters can share one NATS deployment.
const DefaultNamespace = "rbee"

// MaxIDLen bounds an id. 64 characters fit a UUID, a hostname label or a model
// name, and keep subjects (and KV keys, which are subjects) short.
const MaxIDLen = 64

// ErrInvalidID is wrapped by every validation failure.
var ErrInvalidID = errors.New("invalid id")

// Kind names what an id identifies; it appears in validation errors.
type Kind string

const (
	KindJob       Kind = "job id"
	KindHive      Kind = "hive id"
	KindWorker    Kind = "worker id"
	KindModelKey  Kind = "model key"
	KindQueen     Kind = "queen id"
	KindNamespace Kind = "namespace"
)

// ValidateID reports whether id is safe as one subject token: 1 to MaxIDLen
// characters from [A-Za-z0-9_-].
func ValidateID(kind Kind, id string) error {
	if id == "" {
		return fmt.Errorf("%w: %s is empty; use 1-%d characters from A-Z a-z 0-9 _ -", ErrInvalidID, kind, MaxIDLen)
	}
	if len(id) > MaxIDLen {
		return fmt.Errorf("%w: %s %q is %d characters long; the limit is %d", ErrInvalidID, kind, truncate(id), len(id), MaxIDLen)
	}
	for i := 0; i < len(id); i++ {
		if !tokenByte(id[i]) {
			return fmt.Errorf("%w: %s %q contains %q at position %d; only A-Z a-z 0-9 _ - are allowed", ErrInvalidID, kind, truncate(id), rune(id[i]), i)
		}
	}
	return nil
}

func tokenByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// ValidateModelID checks a model id as users write it: like a token but '.'
// is allowed too (model names carry versions: "llama-3.2-1b"), without a
// leading dot or "..", so the id is also safe as a folder name.
func ValidateModelID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: model id is empty; use 1-%d characters from A-Z a-z 0-9 . _ -", ErrInvalidID, MaxIDLen)
	}
	if len(id) > MaxIDLen {
		return fmt.Errorf("%w: model id %q is %d characters long; the limit is %d", ErrInvalidID, truncate(id), len(id), MaxIDLen)
	}
	if id[0] == '.' || strings.Contains(id, "..") {
		return fmt.Errorf("%w: model id %q may not start with '.' or contain \"..\"", ErrInvalidID, id)
	}
	for i := 0; i < len(id); i++ {
		if !tokenByte(id[i]) && id[i] != '.' {
			return fmt.Errorf("%w: model id %q contains %q at position %d; only A-Z a-z 0-9 . _ - are allowed", ErrInvalidID, truncate(id), rune(id[i]), i)
		}
	}
	return nil
}

// ModelKey derives the subject token for a model id. Ids that already are
// valid tokens are their own key; others have '.' replaced and a short hash
// of the id appended, so "a.b" and "a_b" never share a work queue.
func ModelKey(id string) (string, error) {
	if err := ValidateModelID(id); err != nil {
		return "", err
	}
	if ValidateID(KindModelKey, id) == nil {
		return id, nil
	}
	sum := sha256.Sum256([]byte(id))
	key := strings.ReplaceAll(id, ".", "_")
	suffix := "-" + hex.EncodeToString(sum[:4])
	if len(key)+len(suffix) > MaxIDLen {
		key = key[:MaxIDLen-len(suffix)]
	}
	return key + suffix, nil
}
