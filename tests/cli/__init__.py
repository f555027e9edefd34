"""The `moderation` command."""
