"""The tests, laid out as the package: one directory per sub-package of moderation/ (worker, model, offline,
review, devkit), the contracts (events, settings, asyncapi) and the package as a whole at the top, deploy/ for
deploy/ and docker/, bench/ for bench/, and stream/ for the end-to-end runs through a real worker. The shared
fixtures are pytest plugins under fixtures/ (listed in conftest.py)."""
