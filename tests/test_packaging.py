"""Our ops install as ``linearize.kernels``: nothing named ``kernels`` (Hugging Face's package, which
transformers probes for and, from 5.25, depends on) comes from this project, from the repository root or elsewhere.

The top-level ``kernels/`` folder has no ``__init__.py``: from the repository root (``python -m`` and pytest put it
on sys.path) it is at most a namespace portion, which any installed regular package of that name outranks; the op
tests live in ``tests/ops`` (a ``tests/kernels`` package would shadow it the same way under pytest)."""

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
hf = import_utils.is_kernels_available()
if hf:  # what transformers does with it: must import Hugging Face's names, not find our folder
    import transformers.integrations.hub_kernels  # noqa: F401
print(json.dumps({"ops": ops.__file__, "kernels_origin": str(origin), "hf_kernels_available": hf}))
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
    _not_ours(got["kernels_origin"])


def _not_ours(origin: str):
    """`kernels`, if anything, is someone else's package (Hugging Face's, maybe in a .venv inside the checkout)."""
    assert str(ROOT / "kernels") not in origin and str(ROOT / "tests") not in origin, origin


def test_transformers_does_not_mistake_our_ops_for_hf_kernels():
    """From the repository root (python -m puts it on sys.path) transformers sees Hugging Face's `kernels` where it
    is installed (a dependency of transformers from 5.25) and can import from it, and never takes our folder for it."""
    try:
        importlib.metadata.version("kernels")
        hf_installed = True
    except importlib.metadata.PackageNotFoundError:
        hf_installed = False
    got = _probe(ROOT)  # (exits non-zero if transformers' hub_kernels cannot import Hugging Face's names)
    assert got["hf_kernels_available"] is hf_installed
    if hf_installed:  # (without it, our folder may be found as a namespace portion, which transformers ignores)
        _not_ours(got["kernels_origin"])
