"""Hypothesis profiles: "dev" explores fresh examples on every run; "ci" is derandomized so a CI run is
repeatable, and a failure it finds reproduces locally with HYPOTHESIS_PROFILE=ci."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
