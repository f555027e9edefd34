"""The `moderation` command. `main.py` is its root: it only registers one module per command group, as vLLM's
`vllm/entrypoints/cli/main.py` does, and owns the one error handler of every command. `options.py` and
`output.py` hold what the command modules share: options, settings loading, the console."""
