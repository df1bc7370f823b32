package subjects

// LeaderElected is the advisory a NATS cluster publishes when stream (a
// KV bucket's stream too: KVStream) has elected a new leader. Until then
// the stream took no writes: heartbeats included, so entries may have
// expired for want of a leader, not of their owner.
func LeaderElected(stream string) string {
	return "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED." + stream
}
