"""moderation.devkit: the embedded local stack, the demo and the synthetic images."""
