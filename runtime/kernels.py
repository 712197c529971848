"""Choice of the expert graphs the installed onnxruntime can run.

onnxruntime added a 2-bit MatMulNBits kernel after 1.22 (the version Termux ships). A 2-bit
expert therefore comes with two graphs over the same data file: the native one, and one that
widens the weights to 4 bits when the session is created (see edgemoe.export.layers.widened_copy).
`adapt_experts` picks the graph the installed onnxruntime can run: storage and reads stay 2-bit,
and only the memory of a loaded expert grows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort

from edgemoe.runtime.manifest import ExpertEntry, Manifest, load_manifest
from edgemoe.runtime.sessions import expert_session

logger = logging.getLogger(__name__)

_native_2bit: bool | None = None  # probed once per process


def has_2bit_kernel(bundle_dir: str | os.PathLike, entry: ExpertEntry) -> bool:
    """Return whether onnxruntime runs 2-bit MatMulNBits, found by creating `entry`'s native session.

    When that fails, the widened graph of the same expert is tried. If it loads, the kernel is
    what is missing. If it fails too, the files are at fault, and True is returned so that
    loading the expert reports the real error.
    """
    global _native_2bit
    if _native_2bit is None:
        bundle = Path(bundle_dir)
        try:
            expert_session(str(bundle / entry.file), prepack=True, quiet=True)
            _native_2bit = True
        except Exception as native_error:  # onnxruntime raises its own exception types
            try:
                expert_session(str(bundle / entry.widened_file), prepack=True, quiet=True)
            except Exception:
                return True
            logger.debug("2-bit MatMulNBits is not available: %s", native_error)
            _native_2bit = False
    return _native_2bit


def adapt_experts(bundle_dir: str | os.PathLike, experts: list[ExpertEntry],
                  widen: bool | None = None) -> list[ExpertEntry]:
    """Return `experts` with every 2-bit entry pointing at the graph this onnxruntime can run.

    Args:
        widen: True loads the widened graphs, False the native ones, None (the default) the
            native ones when onnxruntime has a 2-bit kernel.
    """
    two_bit = [e for e in experts if e.bits == 2 and e.widened_file]
    if not two_bit:
        return list(experts)
    if widen is None:
        widen = not has_2bit_kernel(bundle_dir, two_bit[0])
        if widen:
            _log_widening_once(len(two_bit), two_bit[0])
    if not widen:
        return list(experts)
    return [replace(e, file=e.widened_file, resident_bytes=e.widened_resident_bytes)
            if e.bits == 2 and e.widened_file else e for e in experts]


_logged = False


def _log_widening_once(count: int, example: ExpertEntry) -> None:
    global _logged
    if _logged:
        return
    _logged = True
    logger.warning("onnxruntime %s has no 2-bit MatMulNBits kernel: %d 2-bit experts are widened to "
                   "4 bits when loaded. Storage reads stay 2-bit, and a loaded expert takes %.1f MB instead "
                   "of %.1f MB. onnxruntime 1.32 runs them natively.", ort.__version__, count,
                   example.widened_resident_bytes / 1e6, example.resident_bytes / 1e6)


def runtime_manifest(bundle_dir: str | os.PathLike, widen: bool | None = None) -> Manifest:
    """Load a bundle's manifest with its experts adapted by `adapt_experts`, so that expert
    sizes, and budgets given as percentages of them, are those of the graphs that will load."""
    manifest = load_manifest(bundle_dir)
    manifest.experts = adapt_experts(bundle_dir, manifest.experts, widen)
    manifest.__post_init__()  # rebuilds the (layer, index) lookup
    return manifest
