"""A proxy without mTLS must not load ssl's certificate machinery or cryptography.

cryptography costs about 14 MB of resident memory and is needed only for identity (the CA, CSRs, the
agent's key); the issue's memory target (RSS <= 40 MB for one proxy) depends on a plain proxy never importing
it. These run in a fresh interpreter, because this test process has long imported everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# What `tether proxy --listen ... --to ...` imports before it serves: the CLI, the process runner, the
# machine, and the admin server's Prometheus rendering.
PLAIN_PROXY_MODULES = (
    "tether.adapters.cli",
    "tether.adapters.serve",
    "tether.adapters.proxy_config",
    "tether.core.proxy",
)


def _loaded_after(imports: tuple[str, ...], probes: tuple[str, ...]) -> dict[str, bool]:
    code = "\n".join(
        [
            "import sys",
            *(f"import {name}" for name in imports),
            f"print(','.join(str(p in sys.modules) for p in {probes!r}))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return dict(zip(probes, (word == "True" for word in result.stdout.strip().split(",")), strict=True))


def test_a_plain_proxy_never_imports_cryptography() -> None:
    loaded = _loaded_after(PLAIN_PROXY_MODULES, ("cryptography", "tether.core.identity.tls", "importlib.metadata"))
    assert loaded == {"cryptography": False, "tether.core.identity.tls": False, "importlib.metadata": False}


@pytest.mark.parametrize("module", ["tether.adapters.identity_cli", "tether.adapters.identity_agent"])
def test_the_identity_modules_do_import_it(module: str) -> None:
    # The probe itself works: the modules that need cryptography show up as loading it.
    assert _loaded_after((module,), ("cryptography",)) == {"cryptography": True}
