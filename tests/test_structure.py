"""The package layout keeps its promises: cores that import alone, without the servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["common.nbd.protocol", "common.hrl", "common.tls.identities"])
def test_core_imports_without_aiohttp_or_cryptography(module: str) -> None:
    """The NBD core, the HRL codec and the TLS identities load neither aiohttp nor (but for the
    identities, which parse certificates) cryptography, in a fresh interpreter."""
    heavy = ["aiohttp"] if module == "common.tls.identities" else ["aiohttp", "cryptography"]
    code = (
        f"import sys, {module}\n"
        f"loaded = [name for name in {heavy!r} if name in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"
