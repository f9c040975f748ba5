"""The proxy machine: one object owns every connection of one proxy process."""

from tether.core.proxy.errors import ProxyError, ProxyErrorKind
from tether.core.proxy.machine import Proxy
from tether.core.proxy.stats import LatencyHistogram, ProxyStats, ServiceStats

__all__ = ["LatencyHistogram", "Proxy", "ProxyError", "ProxyErrorKind", "ProxyStats", "ServiceStats"]
