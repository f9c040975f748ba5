"""What the simulator's Hypothesis property tests share: drawn fault schedules, and failure reports that
say how to replay the drawn scenario."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st


@st.composite
def faults(
    draw: st.DrawFn,
    *,
    duration_s: float,
    crashable: Sequence[str],
    links: Sequence[tuple[str, str]],
    most: int = 4,
    longest_s: float = 6.0,
) -> list[dict[str, Any]]:
    """Up to ``most`` faults: crashes of ``crashable`` hosts, and partitions, loss or latency on ``links``."""
    drawn: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, most))):
        kind = draw(st.sampled_from(["partition", "crash", "loss", "latency"]))
        at_s = draw(st.floats(0.2, duration_s - 0.5))
        length_s = draw(st.floats(0.1, longest_s))
        if kind == "crash":
            fault: dict[str, Any] = {"kind": kind, "hosts": [draw(st.sampled_from(list(crashable)))]}
        else:
            fault = {"kind": kind, "hosts": list(draw(st.sampled_from(list(links))))}
            if kind == "partition":
                fault["one_way"] = draw(st.booleans())
            if kind == "loss":
                fault["loss"] = draw(st.sampled_from([0.05, 0.2, 0.5]))
            if kind == "latency":
                fault["latency_ms"] = {"min": draw(st.sampled_from([5, 50, 500])), "tail_mean": 20}
        fault.update(at_s=round(at_s, 3), duration_s=round(length_s, 3))
        drawn.append(fault)
    return drawn


def report(data: dict[str, Any], seed: int, violations: list[str], *, prefix: str) -> str:
    """Write the drawn scenario to .tether-failures/ and say how to replay it."""
    text = yaml.safe_dump(data, sort_keys=False)
    folder = Path(".tether-failures")
    folder.mkdir(exist_ok=True)
    path = folder / f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.write_text(text)
    return (
        f"{len(violations)} violations, first: {violations[0]}\n"
        f"replay with: tether sim {path} --seed {seed}\nscenario: {json.dumps(data)}"
    )
