"""moderation.offline: scan, eval, the reports, model check and tail."""
