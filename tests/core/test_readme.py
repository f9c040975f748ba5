"""The README opens with exactly two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    demo, tests = blocks[0], blocks[1]
    assert readme.index("```sh") < readme.index("\n\n", readme.index("# Tether") + 10) + 3
    assert demo.strip().endswith("tether demo") and "\n" not in demo.strip()
    assert "pytest" in tests and "\n" not in tests.strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests.strip() in ci, "the CI script must run the README's test command verbatim"
