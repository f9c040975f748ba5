"""Thin anyio drivers for the core machines: sockets, clocks, entropy, and the command line."""
