package llamalib

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fake replaces the lookup hooks for one test.
type fake struct {
	exe, wd, home string
	env           map[string]string
}

func (f fake) install(t *testing.T) {
	t.Helper()
	oe, ow, og, oh := executable, getwd, getenv, homeDir
	t.Cleanup(func() { executable, getwd, getenv, homeDir = oe, ow, og, oh })
	executable = func() (string, error) {
		if f.exe == "" {
			return "", errors.New("no exe")
		}
		return f.exe, nil
	}
	getwd = func() (string, error) { return f.wd, nil }
	getenv = func(k string) string { return f.env[k] }
	homeDir = func() (string, error) { return f.home, nil }
}

func mkLib(t *testing.T, dir string) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, LibName), nil, 0o644))
	return dir
}

func TestFindOrder(t *testing.T) {
	root := t.TempDir()
	explicit := mkLib(t, filepath.Join(root, "explicit"))
	env := mkLib(t, filepath.Join(root, "env"))
	// <exe dir>/../.deps/llama
	exeDeps := mkLib(t, filepath.Join(root, "inst", ".deps", "llama"))
	exe := filepath.Join(root, "inst", "bin", "rbee")
	// module root with go.mod, working dir below it
	mod := filepath.Join(root, "repo")
	require.NoError(t, os.MkdirAll(filepath.Join(mod, "a", "b"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(mod, "go.mod"), []byte("module x\n"), 0o644))
	modDeps := mkLib(t, filepath.Join(mod, ".deps", "llama"))
	xdg := mkLib(t, filepath.Join(root, "xdg", "rbee", "llama"))

	f := fake{exe: exe, wd: filepath.Join(mod, "a", "b"), home: filepath.Join(root, "home"),
		env: map[string]string{EnvVar: env, "XDG_DATA_HOME": filepath.Join(root, "xdg")}}
	f.install(t)

	steps := []struct {
		name string
		want string
		drop func()
	}{
		{"explicit", explicit, func() { explicit = "" }},
		{"env", env, func() { delete(f.env, EnvVar); f.install(t) }},
		{"exe", exeDeps, func() { require.NoError(t, os.RemoveAll(exeDeps)) }},
		{"module", modDeps, func() { require.NoError(t, os.RemoveAll(modDeps)) }},
		{"xdg", xdg, func() { require.NoError(t, os.RemoveAll(xdg)) }},
	}
	for _, s := range steps {
		got, err := Find(explicit)
		require.NoError(t, err, s.name)
		assert.Equal(t, s.want, got, s.name)
		s.drop()
	}
	_, err := Find("")
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "go tool task deps")
	assert.Contains(t, err.Error(), "scripts/llama-libs.sh")
	assert.Contains(t, err.Error(), EnvVar)
}

func TestFindHomeDefault(t *testing.T) {
	root := t.TempDir()
	home := filepath.Join(root, "home")
	want := mkLib(t, filepath.Join(home, ".local", "share", "rbee", "llama"))
	fake{wd: root, home: home, env: map[string]string{}}.install(t)
	got, err := Find("")
	require.NoError(t, err)
	assert.Equal(t, want, got)
}

func TestFindExplicitMissingIsError(t *testing.T) {
	root := t.TempDir()
	// Even though the module has libraries, a wrong explicit dir is reported.
	mkLib(t, filepath.Join(root, ".deps", "llama"))
	require.NoError(t, os.WriteFile(filepath.Join(root, "go.mod"), nil, 0o644))
	fake{wd: root, home: root, env: map[string]string{}}.install(t)
	_, err := Find(filepath.Join(root, "nope"))
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "--llama-lib")

	fake{wd: root, home: root, env: map[string]string{EnvVar: filepath.Join(root, "nope")}}.install(t)
	_, err = Find("")
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "$"+EnvVar)
}

func TestFindRelativeIsMadeAbsolute(t *testing.T) {
	root := t.TempDir()
	mkLib(t, filepath.Join(root, "libs"))
	t.Chdir(root)
	got, err := Find("libs")
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(got))
	assert.Equal(t, filepath.Join(root, "libs"), got)
}
