"""Endpoint choice behind a small interface.

``Picker.pick`` gets the endpoint set and the proxy's injected RNG and returns one endpoint. Round robin
is a placeholder for the peak-EWMA power-of-two-choices balancer of the traffic issue; whatever replaces
it must stay deterministic given the RNG, so the simulator can replay it.
"""

from __future__ import annotations

import random
from typing import Protocol

from tether.core.address import Address
from tether.core.discovery import EndpointSet


class Picker(Protocol):
    def pick(self, endpoint_set: EndpointSet, rng: random.Random) -> Address:
        """Return one endpoint of a non-empty set."""
        ...


class RoundRobin:
    """Cycles through each set's endpoints; the position is kept per set name.

    The starting position of a set is drawn from the RNG so that many proxies started together do not
    all send their first request to the same endpoint.
    """

    def __init__(self) -> None:
        self._next_index: dict[str, int] = {}

    def pick(self, endpoint_set: EndpointSet, rng: random.Random) -> Address:
        endpoints = endpoint_set.endpoints
        assert endpoints, "pick() needs a non-empty endpoint set"
        index = self._next_index.get(endpoint_set.name)
        if index is None:
            index = rng.randrange(len(endpoints))
        self._next_index[endpoint_set.name] = index + 1
        return endpoints[index % len(endpoints)]
