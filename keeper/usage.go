package keeper

import (
	"fmt"
	"math"
	"os"
	"regexp"
	"strings"

	"github.com/urfave/cli/v2"
)

// A usage error, wherever it is found (the flag parser, a required flag, a
// value out of its range, an action's own check), ends the command with
// exit 2 before anything reaches the bus. What urfave/cli does by itself
// differs per case (help on stdout, "Incorrect Usage", exit 1, or help
// printed for a positional argument as if it were a command), so every
// command gets the same handling here.

// prepareCommands gives every command in the tree the keeper's answer to a
// usage error and its checks of flag values.
func prepareCommands(cmds []*cli.Command) {
	for _, cmd := range cmds {
		cmd.OnUsageError = onUsageError
		required := takeRequired(cmd.Flags)
		flags, before := cmd.Flags, cmd.Before
		cmd.Before = func(c *cli.Context) error {
			for _, name := range required {
				if !c.IsSet(name) {
					return usage("%s needs --%s", commandName(c), name)
				}
			}
			if err := checkFlagValues(c, flags); err != nil {
				return err
			}
			if before != nil {
				return before(c)
			}
			return nil
		}
		prepareCommands(cmd.Subcommands)
	}
}

// takeRequired turns urfave's required flags into the keeper's own check:
// urfave reports a missing one by printing help on stdout and, when the
// command has arguments, by taking the first for a help topic.
func takeRequired(flags []cli.Flag) []string {
	var names []string
	for _, f := range flags {
		if sf, ok := f.(*cli.StringFlag); ok && sf.Required {
			sf.Required = false
			sf.Usage += " (required)"
			names = append(names, sf.Name)
		}
	}
	return names
}

// checkFlagValues refuses values the parser accepts but no command means:
// NaN or ±Inf for a number (strconv takes them; they cannot even be sent
// as JSON) and a negative duration (every duration here bounds a wait).
func checkFlagValues(c *cli.Context, flags []cli.Flag) error {
	for _, f := range flags {
		switch f := f.(type) {
		case *cli.Float64Flag:
			if v := c.Float64(f.Name); c.IsSet(f.Name) && (math.IsNaN(v) || math.IsInf(v, 0)) {
				return usage("--%s must be a finite number, not %v", f.Name, v)
			}
		case *cli.DurationFlag:
			if v := c.Duration(f.Name); c.IsSet(f.Name) && v < 0 {
				return usage("--%s must not be negative (got %s)", f.Name, v)
			}
		}
	}
	return nil
}

// onUsageError answers a flag the parser refused: the command's help on
// stderr, once, then (through Main) the reason, exit 2.
func onUsageError(c *cli.Context, err error, isSubcommand bool) error {
	showHelpOnStderr(c, isSubcommand)
	return usage("%s", describeFlagError(c, err))
}

func showHelpOnStderr(c *cli.Context, isSubcommand bool) {
	app := c.App
	w := app.Writer
	app.Writer = app.ErrWriter
	if app.Writer == nil {
		app.Writer = os.Stderr
	}
	defer func() { app.Writer = w }()
	lineage := c.Lineage()
	if !isSubcommand || len(lineage) < 2 || c.Command == nil {
		_ = cli.ShowAppHelp(c)
		return
	}
	_ = cli.ShowCommandHelp(lineage[1], c.Command.Name)
}

var (
	reBadValue  = regexp.MustCompile(`^invalid value "(.*)" for flag -+([^:]+): (.*)$`)
	reNoValue   = regexp.MustCompile(`^flag needs an argument: -+(.+)$`)
	reUndefined = regexp.MustCompile(`^flag provided but not defined: -+(.+)$`)
)

// describeFlagError rewrites the flag package's messages ("invalid value
// "abc" for flag -temperature: parse error") in the words of this CLI:
// the flag as typed, and what it takes.
func describeFlagError(c *cli.Context, err error) string {
	msg := err.Error()
	if m := reBadValue.FindStringSubmatch(msg); m != nil {
		var f cli.Flag
		if c.Command != nil {
			f = findFlag(c.Command.Flags, m[2])
		}
		if f == nil {
			f = findFlag(c.App.Flags, m[2])
		}
		want := wants(f)
		if want == "" {
			want = "a valid value"
		}
		if strings.Contains(m[3], "range") {
			return fmt.Sprintf("--%s: %q is out of range for %s", m[2], m[1], want)
		}
		return fmt.Sprintf("--%s takes %s, not %q", m[2], want, m[1])
	}
	if m := reNoValue.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("--%s needs a value", m[1])
	}
	if m := reUndefined.FindStringSubmatch(msg); m != nil {
		name := "--" + m[1]
		if len(m[1]) == 1 {
			name = "-" + m[1]
		}
		return fmt.Sprintf("unknown flag %s for %s", name, commandName(c))
	}
	return msg
}

// commandName is the command as typed ("rbee hive get"); urfave's
// FullName gives only the last word for a subcommand.
func commandName(c *cli.Context) string {
	switch {
	case c.Command == nil || c.Command.Name == "" || c.Command.Name == c.App.Name:
		return c.App.Name
	case c.Command.HelpName != "":
		return c.Command.HelpName
	}
	return c.App.Name + " " + c.Command.Name
}

func findFlag(flags []cli.Flag, name string) cli.Flag {
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				return f
			}
		}
	}
	return nil
}

// wants says what a flag's value must look like.
func wants(f cli.Flag) string {
	switch f.(type) {
	case *cli.Float64Flag:
		return "a number"
	case *cli.IntFlag, *cli.Int64Flag:
		return "a whole number"
	case *cli.UintFlag, *cli.Uint64Flag:
		return "a whole number of 0 or more"
	case *cli.DurationFlag:
		return "a duration such as 30s, 2m or 1h30m"
	case *cli.BoolFlag:
		return "true or false"
	}
	return ""
}
