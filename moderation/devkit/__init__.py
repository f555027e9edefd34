"""For development, demos and tests only: the local stack and its servers, the demo, synthetic images,
the tiny checkpoints and their training. Nothing deployed imports it."""
