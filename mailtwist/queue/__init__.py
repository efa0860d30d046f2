"""The outbound queue: a durable spool, the runner that empties it, and the
dispatcher that fills it (see docs/architecture.md, "Outbound")."""
