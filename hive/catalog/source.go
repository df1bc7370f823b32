package catalog

import (
	"fmt"
	"net/url"
	"path"
	"strings"
)

// sourceForms is shown whenever a source is refused, so the user sees what
// would have worked.
const sourceForms = "use https://host/path/file.gguf, hf:org/repo/file.gguf[@revision] or file:///absolute/path/file.gguf"

// ParseSource turns a model source as a user writes it into the URL to
// fetch: http(s) URLs stay as they are, hf:org/repo/path/file.gguf[@rev]
// becomes <hubBase>/org/repo/resolve/<rev or main>/path/file.gguf, and
// file:///abs/path stays a file URL (copied by Add). Errors wrap
// ErrInvalidRequest.
func ParseSource(s, hubBase string) (*url.URL, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("catalog: %w: field \"source\" is empty; %s", ErrInvalidRequest, sourceForms)
	}
	if rest, ok := strings.CutPrefix(s, "hf:"); ok {
		return parseHF(s, rest, hubBase)
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w: field \"source\" %q: %v; %s", ErrInvalidRequest, s, err, sourceForms)
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		if u.Host == "" {
			return nil, fmt.Errorf("catalog: %w: field \"source\" %q has no host; %s", ErrInvalidRequest, s, sourceForms)
		}
		return u, nil
	case "file":
		// file://host/path would name another machine; only local files are copied.
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("catalog: %w: field \"source\" %q names host %q; file sources must be local: file:///absolute/path", ErrInvalidRequest, s, u.Host)
		}
		if !path.IsAbs(u.Path) || u.Opaque != "" {
			return nil, fmt.Errorf("catalog: %w: field \"source\" %q is not an absolute path; write file:///absolute/path", ErrInvalidRequest, s)
		}
		u.Host = ""
		u.Path = path.Clean(u.Path)
		return u, nil
	default:
		return nil, fmt.Errorf("catalog: %w: field \"source\" %q has an unsupported form; %s", ErrInvalidRequest, s, sourceForms)
	}
}

func parseHF(s, rest, hubBase string) (*url.URL, error) {
	rev := "main"
	if i := strings.LastIndexByte(rest, '@'); i >= 0 {
		rev = rest[i+1:]
		rest = rest[:i]
		if rev == "" {
			return nil, fmt.Errorf("catalog: %w: field \"source\" %q has an empty revision after '@'", ErrInvalidRequest, s)
		}
	}
	parts := strings.Split(rest, "/")
	if len(parts) < 3 {
		return nil, fmt.Errorf("catalog: %w: field \"source\" %q: hf sources name org, repo and file: hf:org/repo/file.gguf", ErrInvalidRequest, s)
	}
	for _, p := range parts {
		// Empty, "." and ".." segments would let a source walk out of the repo path on the hub.
		if p == "" || p == "." || p == ".." {
			return nil, fmt.Errorf("catalog: %w: field \"source\" %q has an empty, '.' or '..' path segment", ErrInvalidRequest, s)
		}
	}
	if hubBase == "" {
		hubBase = DefaultHubBase
	}
	base, err := url.Parse(strings.TrimRight(hubBase, "/"))
	if err != nil || base.Host == "" || (base.Scheme != "http" && base.Scheme != "https") {
		return nil, fmt.Errorf("catalog: %w: hub base %q is not an http(s) URL", ErrInvalidRequest, hubBase)
	}
	segs := append([]string{parts[0], parts[1], "resolve", rev}, parts[2:]...)
	escaped := make([]string, len(segs))
	for i, seg := range segs {
		escaped[i] = url.PathEscape(seg)
	}
	u := *base
	u.RawPath = base.EscapedPath() + "/" + strings.Join(escaped, "/")
	u.Path = base.Path + "/" + strings.Join(segs, "/")
	return &u, nil
}

// nameFromSource is the default model id: the file's base name without .gguf.
func nameFromSource(u *url.URL) string {
	base := path.Base(u.Path)
	if base == "/" || base == "." {
		return ""
	}
	if strings.HasSuffix(strings.ToLower(base), ".gguf") {
		base = base[:len(base)-len(".gguf")]
	}
	return base
}
