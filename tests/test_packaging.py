"""Our ops install as ``linearize.kernels``: nothing named ``kernels`` (Hugging Face's package, which
transformers probes for) comes from this project, from the repository root or elsewhere."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from conftest import ROOT

PROBE = """
import importlib.util, json
import linearize.kernels.hybrid_attention as ops
from transformers.utils import import_utils
spec = importlib.util.find_spec("kernels")
origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))
print(json.dumps({"ops": ops.__file__, "kernels_origin": str(origin),
                  "hf_kernels_available": import_utils.is_kernels_available()}))
"""


def _probe(cwd):
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_distribution_installs_no_top_level_kernels():
    owners = importlib.metadata.packages_distributions()
    assert "linearize" in owners.get("linearize", [])
    assert "linearize" not in owners.get("kernels", []), owners.get("kernels")


def test_ops_import_as_linearize_kernels_outside_the_repo(tmp_path):
    got = _probe(tmp_path)
    from pathlib import Path

    assert str(Path(got["ops"]).resolve()).startswith(str(ROOT / "kernels"))  # via linearize/kernels -> ../kernels
    assert str(ROOT) not in got["kernels_origin"]  # `kernels`, if anything, is someone else's package


def test_transformers_does_not_mistake_our_ops_for_hf_kernels():
    """From the repository root (python -m puts it on sys.path) transformers must not see a usable `kernels`."""
    try:
        importlib.metadata.version("kernels")
        hf_installed = True
    except importlib.metadata.PackageNotFoundError:
        hf_installed = False
    got = _probe(ROOT)
    if not hf_installed:
        assert got["hf_kernels_available"] is False
