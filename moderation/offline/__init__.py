"""Tools that run over files rather than a stream: scan, eval, the model check and their reports."""
