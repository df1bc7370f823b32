package remote_test

import (
	"os"
	"os/user"
	"path/filepath"
	"testing"

	"github.com/rbee-dev/rbee/internal/remote"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseTarget(t *testing.T) {
	me, err := user.Current()
	require.NoError(t, err)
	home, err := os.UserHomeDir()
	require.NoError(t, err)

	cfg := filepath.Join(t.TempDir(), "config")
	require.NoError(t, os.WriteFile(cfg, []byte(`
Host box
  HostName 10.1.2.3
  User alice
  Port 2200
  IdentityFile ~/keys/box_ed25519
  IdentityFile /abs/key

Host v6
  HostName ::1
  Port 2222

Host *.lan
  User bob
  IdentityFile ~/.ssh/lan_%r
`), 0o600))

	tests := []struct {
		spec string
		want remote.Target
		str  string
	}{
		{"bob@example.com:2022", remote.Target{Alias: "example.com", Host: "example.com", User: "bob", Port: 2022}, "bob@example.com:2022"},
		{"example.com", remote.Target{Alias: "example.com", Host: "example.com", User: me.Username, Port: 22}, me.Username + "@example.com:22"},
		{"10.0.0.7:22", remote.Target{Alias: "10.0.0.7", Host: "10.0.0.7", User: me.Username, Port: 22}, ""},
		{"[::1]:2222", remote.Target{Alias: "::1", Host: "::1", User: me.Username, Port: 2222}, me.Username + "@[::1]:2222"},
		{"root@[::1]:2222", remote.Target{Alias: "::1", Host: "::1", User: "root", Port: 2222}, "root@[::1]:2222"},
		{"root@[fe80::1]", remote.Target{Alias: "fe80::1", Host: "fe80::1", User: "root", Port: 22}, ""},
		{"::1", remote.Target{Alias: "::1", Host: "::1", User: me.Username, Port: 22}, ""},
		{"box", remote.Target{Alias: "box", Host: "10.1.2.3", User: "alice", Port: 2200,
			IdentityFiles: []string{filepath.Join(home, "keys/box_ed25519"), "/abs/key"}}, "alice@10.1.2.3:2200"},
		{"carol@box:2300", remote.Target{Alias: "box", Host: "10.1.2.3", User: "carol", Port: 2300,
			IdentityFiles: []string{filepath.Join(home, "keys/box_ed25519"), "/abs/key"}}, ""},
		{"v6", remote.Target{Alias: "v6", Host: "::1", User: me.Username, Port: 2222}, me.Username + "@[::1]:2222"},
		{"gpu1.lan", remote.Target{Alias: "gpu1.lan", Host: "gpu1.lan", User: "bob", Port: 22,
			IdentityFiles: []string{filepath.Join(home, ".ssh/lan_bob")}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := remote.ParseTarget(tc.spec, remote.WithConfigFile(cfg))
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			if tc.str != "" {
				assert.Equal(t, tc.str, got.String())
			}
		})
	}

	for _, bad := range []string{"", "user@", "@host", "host:0", "host:99999", "host:abc", "[::1", "[::1]x", "a b", "host;rm -rf /", "::1:2222x", ":22"} {
		t.Run("bad/"+bad, func(t *testing.T) {
			_, err := remote.ParseTarget(bad, remote.WithConfigFile(cfg))
			assert.Error(t, err)
		})
	}
}

func TestParseTargetConfigOptional(t *testing.T) {
	tg, err := remote.ParseTarget("u@h", remote.WithConfigFile(filepath.Join(t.TempDir(), "missing")))
	require.NoError(t, err)
	assert.Equal(t, remote.Target{Alias: "h", Host: "h", User: "u", Port: 22}, tg)

	// WithIdentity lands in the target ahead of config identities.
	tg, err = remote.ParseTarget("u@h", remote.WithConfigFile(""), remote.WithIdentity("~/k1"))
	require.NoError(t, err)
	home, _ := os.UserHomeDir()
	assert.Equal(t, []string{filepath.Join(home, "k1")}, tg.IdentityFiles)
}
