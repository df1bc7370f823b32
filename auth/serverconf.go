package auth

import (
	"bytes"
	"fmt"
	"sort"
	"strconv"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rbee-dev/rbee/subjects"
)

// ServerConfig renders the authorization block of a nats-server
// configuration file that enforces rbee's roles for creds, for a NATS
// deployment rbee does not embed. Such a server learns of credentials only
// from its configuration, so workers, which the embedded bus gives keys of
// their own as they start, use their hive's key there: a hive's user is
// granted what its workers need too, still scoped to that hive.
func ServerConfig(s subjects.Space, creds []Credential) []byte {
	var b bytes.Buffer
	b.WriteString("# rbee authorization, made by `rbee creds server-config`. Include it in the\n")
	b.WriteString("# nats-server configuration; make it again after issuing or revoking.\n")
	b.WriteString("authorization {\n  users = [\n")
	sorted := append([]Credential(nil), creds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	callerInboxes := callers(sorted)
	for _, c := range sorted {
		if c.Principal.Role == RoleWorker {
			continue
		}
		perms := Permissions(s, c.Principal, c.PublicKey)
		if c.Principal.Role == RoleHive {
			perms = merge(perms, hiveWorkers(s, c.Principal.Hive))
			perms = merge(perms, &server.Permissions{Publish: &server.SubjectPermission{Allow: callerInboxes}, Subscribe: &server.SubjectPermission{}})
		}
		fmt.Fprintf(&b, "    # %s (%s%s)\n", c.Name, c.Principal.Role, scopeText(c.Principal))
		fmt.Fprintf(&b, "    { nkey: %q, permissions: {\n", c.PublicKey)
		writeSubjects(&b, "publish", perms.Publish)
		writeSubjects(&b, "subscribe", perms.Subscribe)
		if perms.Response != nil {
			fmt.Fprintf(&b, "      allow_responses: { max: %d, expires: %q }\n", perms.Response.MaxMsgs, perms.Response.Expires.String())
		}
		b.WriteString("    } }\n")
	}
	b.WriteString("  ]\n}\n")
	return b.Bytes()
}

func writeSubjects(b *bytes.Buffer, kind string, p *server.SubjectPermission) {
	if p == nil {
		return
	}
	fmt.Fprintf(b, "      %s: {", kind)
	for _, part := range []struct {
		name string
		subs []string
	}{{"allow", p.Allow}, {"deny", p.Deny}} {
		if len(part.subs) == 0 {
			continue
		}
		fmt.Fprintf(b, " %s: [", part.name)
		for i, s := range part.subs {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(strconv.Quote(s))
		}
		b.WriteString("]")
	}
	b.WriteString(" }\n")
}

// callers are the inboxes of those who call hives and workers (the queen,
// clients). A hive that joins through a leaf node answers them by
// publishing there: allow_responses, which lets a directly connected hive
// answer, does not carry across a leaf link (the hub tells a leaf of a
// subject only where the leaf's user may publish). The price: a hive may
// publish into a caller's inbox unasked, where it could forge an answer to
// a request it never received; it still cannot read one.
func callers(creds []Credential) []string {
	var out []string
	for _, c := range creds {
		if c.Principal.Role == RoleQueen || c.Principal.Role == RoleClient {
			out = append(out, InboxPrefix(c.PublicKey)+".>")
		}
	}
	return out
}

// hiveWorkers is what any worker of hive needs, for a server that knows
// only the hive's key: RoleWorker's permissions with the worker and the
// model left open (the work queue's per-model consumer names are not
// tokens a permission can open, so any consumer of the work queue).
func hiveWorkers(s subjects.Space, hive string) *server.Permissions {
	st := s.InferStream()
	workers, jobsKV := s.WorkersBucket(), s.JobsBucket()
	endpoints, _ := s.HiveWorkers(hive) // a validated hive id
	pubs := append(jobEvents(s),
		subjects.KVSubject(workers, subjects.WorkerKey(hive, "*")),
		subjects.KVSubject(jobsKV, "*"),
		"$JS.API.CONSUMER.CREATE."+st+".*", "$JS.API.CONSUMER.CREATE."+st+".*.>",
		"$JS.API.CONSUMER.DURABLE.CREATE."+st+".*", "$JS.API.CONSUMER.INFO."+st+".*",
		"$JS.API.CONSUMER.MSG.NEXT."+st+".*", "$JS.ACK."+st+".>",
	)
	pubs = append(pubs, readStream(subjects.KVStream(jobsKV))...)
	pubs = append(pubs, readStream(st)...)
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: pubs},
		Subscribe: &server.SubjectPermission{Allow: []string{endpoints}},
	}
}

func merge(a, b *server.Permissions) *server.Permissions {
	union := func(x, y []string) []string {
		seen := map[string]bool{}
		var out []string
		for _, s := range append(append([]string{}, x...), y...) {
			if !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
		return out
	}
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: union(a.Publish.Allow, b.Publish.Allow)},
		Subscribe: &server.SubjectPermission{Allow: union(a.Subscribe.Allow, b.Subscribe.Allow)},
		Response:  a.Response,
	}
}
