"""The built-in demo model: a small trained Mixtral-style MoE shipped as a Hugging Face checkpoint.

It is exported on first use into the per-user cache (`$EDGEMOE_CACHE_DIR`, else
`$XDG_CACHE_HOME/edgemoe`, else `~/.cache/edgemoe`); the export takes under a second and needs
the `onnx` package (`pip install edgemoe[export]`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from edgemoe import __version__
from edgemoe.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME

logger = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).parent / "demo" / "tinystories-moe-8x"
# Stories sampled from the demo model (scripts/make_demo_calibration.py): the default
# calibration text of `edgemoe export --expert-bits auto`.
DEMO_CALIBRATION = Path(__file__).parent / "demo" / "calibration.txt"


def cache_dir() -> Path:
    if os.environ.get("EDGEMOE_CACHE_DIR"):
        return Path(os.environ["EDGEMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgemoe"


def _fingerprint() -> str:
    """Key of the cached export: changes with the checkpoint, the bundle format and the exporter."""
    digest = hashlib.sha256(f"format {FORMAT_VERSION} edgemoe {__version__}".encode())
    for name in sorted(p.name for p in DEMO_CHECKPOINT.iterdir()):
        stat = (DEMO_CHECKPOINT / name).stat()
        digest.update(f"{name}:{stat.st_size}".encode())
    export_dir = Path(__file__).resolve().parent.parent / "export"
    for source in sorted(export_dir.rglob("*.py")) if export_dir.is_dir() else []:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def demo_bundle() -> Path:
    """Return the demo bundle, exporting it into the cache the first time.

    Raises:
        RuntimeError: the bundle is not cached and the `onnx` package is not installed.
    """
    bundle = cache_dir() / f"demo-tinystories-moe-8x-{_fingerprint()}"
    if (bundle / MANIFEST_NAME).is_file():
        return bundle
    try:
        from edgemoe.export.writer import export_checkpoint
    except ImportError as exc:
        raise RuntimeError(
            "the built-in demo model is exported on first use, which needs the onnx package "
            f"({exc}); install the export extra (pip install '.[export]' in a checkout, "
            "pip install 'edgemoe[export]' otherwise) or pass a bundle directory") from exc
    logger.info("exporting the built-in demo model to %s (first use)", bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    if bundle.exists():
        shutil.rmtree(bundle)  # an incomplete earlier copy: it has no manifest
    export_checkpoint(DEMO_CHECKPOINT, bundle, dtype="fp32", overwrite=True, progress=False)
    return bundle
