"""The fixtures are pytest plugins under tests/fixtures/, one module per concern (as Quix Streams does):
one real local stack per session, every test its own topics, bucket and consumer group."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.stack",
    "tests.fixtures.lanes",
    "tests.fixtures.console",
]
