"""Tether's pure core: sans-IO state machines.

Nothing in this package reads a clock, touches a socket, starts a thread or draws OS entropy. Time arrives
as ``now_ns`` (monotonic integer nanoseconds), randomness as an injected ``random.Random``, bytes and
events as arguments; what should happen comes back as plain-data effects. See docs/architecture.md.
"""
