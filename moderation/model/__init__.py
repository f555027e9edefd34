"""FakeVLM: preprocessing, scoring, weights identity, Triton I/O and the detector backends. What the Triton
model image installs (with `moderation.errors`); never imports the worker, the devkit or the offline tools."""
