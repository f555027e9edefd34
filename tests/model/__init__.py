"""moderation.model: FakeVLM, imaging, weights identity, the detector backends and the Triton models."""
