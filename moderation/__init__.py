"""Content-moderation stream processor: spots AI-generated images with FakeVLM and explains why."""

__version__ = "0.1.0"
