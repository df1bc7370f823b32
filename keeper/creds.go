package keeper

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
)

// --- creds ---

// credsCommand manages the credentials the local queen's bus accepts. It
// works on the queen's data directory directly, never over the bus: whoever
// can read that directory holds the queen's own key anyway, and nobody else
// may issue.
func credsCommand() *cli.Command {
	return &cli.Command{
		Name:  "creds",
		Usage: "issue, list and revoke the credentials the local queen's bus accepts",
		Subcommands: []*cli.Command{
			{
				Name: "issue", Usage: "issue a credential: `client NAME` for a person's machine, `hive ID` for a hive",
				ArgsUsage: "client NAME | hive ID",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "out", Usage: "also write the key to this file (mode 0600), to carry to the machine that will use it"},
				},
				Action: credsIssue,
			},
			{Name: "list", Usage: "list the issued credentials", Action: credsList},
			{Name: "revoke", Usage: "revoke a credential: refused at its next connect, its open connections closed", ArgsUsage: "NAME", Action: credsRevoke},
			{
				Name:   "server-config",
				Usage:  "print the authorization block of a nats-server configuration that enforces rbee's roles, for a NATS you run yourself (issues the queen's and the local client's credentials first if missing)",
				Action: credsServerConfig,
			},
		},
	}
}

func credsStore() (*auth.Store, error) {
	return auth.OpenStore(queen.CredentialsDir(cliutil.Home()))
}

func credsIssue(c *cli.Context) error {
	if c.NArg() != 2 {
		return usage("rbee creds issue takes a role and a name: `client NAME` or `hive ID`")
	}
	role, err := auth.ParseRole(c.Args().Get(0))
	if err != nil {
		return usage("%v", err)
	}
	id := c.Args().Get(1)
	var name string
	var p auth.Principal
	switch role {
	case auth.RoleClient:
		name, p = id, auth.Principal{Role: auth.RoleClient}
	case auth.RoleHive:
		name, p = auth.HiveName(id), auth.Principal{Role: auth.RoleHive, Hive: id}
	case auth.RoleQueen:
		return usage("the queen issues its own credential at its first start")
	case auth.RoleWorker:
		return usage("workers are given credentials by the queen when their hive starts them")
	}
	if err := auth.ValidateName(name); err != nil {
		return usage("%v", err)
	}
	if err := p.Validate(); err != nil {
		return usage("%v", err)
	}
	store, err := credsStore()
	if err != nil {
		return err
	}
	cred, seed, err := store.Issue(name, p)
	if err != nil {
		return err
	}
	out := store.KeyFile(name)
	if o := c.String("out"); o != "" {
		// The copy that travels carries the bus's CA, when the bus has
		// one, so the other machine can verify it is talking to this bus.
		ca, _ := os.ReadFile(auth.CAFile(queen.TLSDir(cliutil.Home())))
		if err := auth.WriteKeyFile(o, name, p, seed, ca); err != nil {
			return fmt.Errorf("writing %s: %w", o, err)
		}
		out, _ = filepath.Abs(o)
	}
	show(c, map[string]any{"name": cred.Name, "role": p.Role, "public_key": cred.PublicKey, "key_file": out}, func(w io.Writer) {
		fmt.Fprintf(w, "issued %s credential %q: %s\n", p.Role, name, out)
		switch p.Role {
		case auth.RoleClient:
			fmt.Fprintf(w, "copy it to the other machine as ~/.local/share/rbee/creds/%s.nk (mode 0600), or pass --creds FILE\n", auth.ClientName)
		case auth.RoleHive:
			fmt.Fprintf(w, "`rbee hive start %s` hands it to the hive; revoke it with `rbee creds revoke %s`\n", id, name)
		}
	})
	return nil
}

func credsList(c *cli.Context) error {
	store, err := credsStore()
	if err != nil {
		return err
	}
	creds, err := store.List()
	if err != nil {
		return err
	}
	show(c, creds, func(w io.Writer) {
		if len(creds) == 0 {
			fmt.Fprintf(w, "no credentials in %s (a queen issues its own at its first start)\n", store.Dir())
			return
		}
		tw := tabwriter.NewWriter(w, 0, 2, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tROLE\tSCOPE\tISSUED\tKEY")
		for _, cr := range creds {
			scope := "-"
			switch cr.Principal.Role {
			case auth.RoleHive:
				scope = "hive " + cr.Principal.Hive
			case auth.RoleWorker:
				scope = fmt.Sprintf("hive %s, model %s", cr.Principal.Hive, cr.Principal.ModelKey)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s…\n", cr.Name, cr.Principal.Role, scope, cr.IssuedAt.Local().Format("2006-01-02 15:04"), cr.PublicKey[:12])
		}
		tw.Flush()
	})
	return nil
}

func credsRevoke(c *cli.Context) error {
	if c.NArg() != 1 {
		return usage("rbee creds revoke takes one credential name (see `rbee creds list`)")
	}
	name := c.Args().First()
	if name == auth.QueenName {
		return usage("the queen's own credential cannot be revoked; stop the queen instead")
	}
	store, err := credsStore()
	if err != nil {
		return err
	}
	cred, err := store.Revoke(name)
	if errors.Is(err, auth.ErrUnknownCredential) {
		return fmt.Errorf("no credential named %q in %s (see `rbee creds list`)", name, store.Dir())
	}
	if err != nil {
		return err
	}
	show(c, map[string]any{"name": cred.Name, "revoked": true}, func(w io.Writer) {
		fmt.Fprintf(w, "revoked %s credential %q: the bus refuses it from its next connect and closes its connections\n", cred.Principal.Role, name)
	})
	return nil
}

func credsServerConfig(c *cli.Context) error {
	store, err := credsStore()
	if err != nil {
		return err
	}
	space, err := subjects.New(c.String(cliutil.FlagNamespace))
	if err != nil {
		return usage("%v", err)
	}
	if _, err := store.Ensure(auth.QueenName, auth.Principal{Role: auth.RoleQueen}); err != nil {
		return err
	}
	if _, err := store.Ensure(auth.ClientName, auth.Principal{Role: auth.RoleClient}); err != nil {
		return err
	}
	creds, err := store.List()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(auth.ServerConfig(space, creds))
	return err
}
