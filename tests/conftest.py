"""Shared fixtures: bundles exported once per session, reference data, a CLI runner.

Every test runs with EDGEMOE_CACHE_DIR pointing at a session temporary directory, so the
built-in demo model is never exported into the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.demo import DEMO_CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
TINY_MODELS = ("tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-qwen2-moe", "tiny-granitemoe",
               "tiny-phimoe", "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-gpt-oss", "tiny-gpt-oss-mxfp4")
DEMO = "demo"
# Held-out TinyStories text that `eval_reference.json` was computed on (its sha256 is in there).
CORPUS_CANDIDATES = (FIXTURES_DIR / "tinystories-eval.txt",
                     REPO_ROOT.parent / "shared" / "corpus" / "tinystories-eval.txt")
CLI_TIMEOUT_SECONDS = 120


def checkpoint_dir(model: str) -> Path:
    """Hugging Face checkpoint directory of a tiny fixture model or of the demo model."""
    return DEMO_CHECKPOINT if model == DEMO else FIXTURES_DIR / "models" / model


def reference_dir(model: str) -> Path:
    return FIXTURES_DIR / "demo" if model == DEMO else FIXTURES_DIR / "models" / model


@dataclass
class Reference:
    """Transformers output recorded by tests/fixtures/make_fixtures.py."""

    prompt_ids: list[int]
    greedy_ids: list[int]  # 32 argmax tokens after the prompt, EOS ignored
    logits: np.ndarray  # [prompt length, vocab] float32, one row per prompt position
    prompt_text: str | None


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """Point EDGEMOE_CACHE_DIR at a temporary directory for the whole session."""
    cache = tmp_path_factory.mktemp("edgemoe-cache")
    previous = os.environ.get("EDGEMOE_CACHE_DIR")
    os.environ["EDGEMOE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("EDGEMOE_CACHE_DIR", None)
    else:
        os.environ["EDGEMOE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory):
    """Return a function (model, dtype, dense_dtype=None) -> bundle directory that exports each
    combination once; dense_dtype None keeps the dense weights at `dtype`."""
    root = tmp_path_factory.mktemp("bundles")
    exported: dict[tuple[str, str, str | None], Path] = {}

    def get(model: str, dtype: str = "fp32", dense_dtype: str | None = None) -> Path:
        key = (model, dtype, dense_dtype)
        if key not in exported:
            out = root / f"{model}-{dtype}" if dense_dtype is None else root / f"{model}-{dtype}-dense-{dense_dtype}"
            export_checkpoint(checkpoint_dir(model), out, dtype=dtype, progress=False, dense_dtype=dense_dtype)
            exported[key] = out
        return exported[key]

    return get


@pytest.fixture(scope="session")
def demo_bundle(bundle_path) -> Path:
    return bundle_path(DEMO)


@pytest.fixture(scope="session")
def tiny_bundle(bundle_path) -> Path:
    return bundle_path("tiny-mixtral")


@pytest.fixture(scope="session")
def load_reference():
    """Return a function model -> Reference."""

    def load(model: str) -> Reference:
        directory = reference_dir(model)
        data = json.loads((directory / "reference.json").read_text())
        return Reference(prompt_ids=data["prompt_ids"], greedy_ids=data["greedy_ids"],
                         logits=np.load(directory / "reference_logits.npy"),
                         prompt_text=data.get("prompt_text"))

    return load


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    for path in CORPUS_CANDIDATES:
        if path.is_file():
            return path
    pytest.fail(f"evaluation corpus not found at {' or '.join(map(str, CORPUS_CANDIDATES))}")


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> None:
    """Write float32 tensors (uint8 ones as they are) in the safetensors format.

    The format is an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and byte range, then the raw little-endian data. `dtypes` overrides the dtype
    written into the header for some names (the data stays float32 bytes).
    """
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        is_bytes = np.asarray(array).dtype == np.uint8  # MXFP4 blocks and scales
        data = np.ascontiguousarray(array, dtype=np.uint8 if is_bytes else "<f4").tobytes()
        dtype = (dtypes or {}).get(name, "U8" if is_bytes else "F32")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for data in blobs:
            f.write(data)


@pytest.fixture(scope="session")
def write_safetensors():
    """Return the safetensors writer: (path, {name: array}, dtypes=None) -> None."""
    return _write_safetensors


@pytest.fixture
def checkpoint_copy(tmp_path):
    """Return a function model -> a writable copy of that fixture checkpoint under tmp_path."""

    def copy(model: str) -> Path:
        destination = tmp_path / f"{model}-checkpoint"
        shutil.copytree(checkpoint_dir(model), destination,
                        ignore=shutil.ignore_patterns("reference*"))
        return destination

    return copy


@pytest.fixture(scope="session")
def run_cli(isolated_cache_dir):
    """Return a function that runs `python -m edgemoe ARGS` in a subprocess.

    The child gets EDGEMOE_CACHE_DIR from `env` or the session cache directory.
    """

    def run(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        child_env = dict(os.environ, EDGEMOE_CACHE_DIR=str(isolated_cache_dir))
        child_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "edgemoe", *map(str, args)], capture_output=True,
                              text=True, env=child_env, cwd=cwd, timeout=CLI_TIMEOUT_SECONDS)

    return run


def flip_byte(path, offset: int) -> None:
    """Invert one byte in place, keeping the file size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
