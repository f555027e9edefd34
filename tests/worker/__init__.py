"""moderation.worker: the pipeline, policy, cache, dead letters, storage, banks and hash lists, tracing, metrics."""
