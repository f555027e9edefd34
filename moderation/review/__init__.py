"""The review console (`moderation review serve`): the reviewers' queue, their images and decisions.

A deployable of its own next to the worker; it reads the review and decisions topics and publishes
decisions, and never imports the worker's pipeline, the devkit or the offline tools.
"""
