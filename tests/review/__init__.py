"""moderation.review: the review console."""
