"""onnxruntime session factory with the options edgemoe relies on.

Measured with onnxruntime 1.32 (x86_64 and aarch64): an expert session created with
`session.disable_prepacking=1` maps its external weights instead of copying them and is created
in a few milliseconds; with prepacking it copies every weight. Every session with its own
spinning thread pool oversubscribes the cores, so expert sessions run on one thread with
spinning off, and dense sessions share the remaining parallelism with spinning off too.
"""

from __future__ import annotations

import os

import onnxruntime as ort


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _base_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def dense_session(path: str, threads: int) -> ort.InferenceSession:
    """Session for a resident graph (embedding, layer attention + router, head)."""
    return ort.InferenceSession(path, _base_options(threads), providers=["CPUExecutionProvider"])


def expert_session(path: str, threads: int = 1, prepack: bool = False, quiet: bool = False) -> ort.InferenceSession:
    """Session for one expert, mapping its weights from storage unless `prepack`.

    Integer experts need `prepack`: MatMulNBits without its prepacked weights took 20-27 ms per
    token instead of 0.2 ms for an H=2048, I=1408 expert (onnxruntime 1.32, x86_64). `quiet`
    keeps onnxruntime from printing an error when creating the session fails.
    """
    options = _base_options(threads)
    if quiet:
        options.log_severity_level = 4
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
