"""Traffic management machines: balancing, failfast queues, retries and budgets, timeouts, circuit
breaking, routes. Each is pure, takes ``now`` and an injected RNG, and is driven by the proxy machine."""
