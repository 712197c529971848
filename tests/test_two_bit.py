"""2-bit experts (`--expert-bits 2`): the error-minimising quantizer, packing, the native kernel and
the widening fallback for onnxruntime versions without it.

Invariants checked:
- Stored values, zero points and scales dequantize to (q - z) * scale, with the bits where
  MatMulNBits reads them.
- The fitted scale and zero point of each block have a squared error at most 1 % above the best
  of a dense brute-force grid over all four zero points, and far below symmetric rounding.
- A 2-bit expert session (native where onnxruntime has the kernel, widened everywhere) matches
  the numpy SwiGLU on the dequantized weights. The widened graph gives the same output as the
  native one, and the numpy widening reference gives the same values as the graph's repacking.
- The runtime widens 2-bit experts exactly when onnxruntime cannot create the native session,
  and says so in the log once per process and in bench's notes. Percentage budgets are of the
  sizes the loaded (possibly widened) experts take.
- A 2-bit demo bundle stores at most 0.65 x the int4 expert bytes, and its perplexity stays
  within 25 % of fp32's (measured +15 %: 26.00 vs 22.60 on the whole evaluation corpus).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import DEMO, checkpoint_dir
from edgemoe.export.layers import quantized_swiglu_expert, widened_copy
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.export.quantize import dequantize, pack, quantize, unpack, unpack_values, widen_2bit, zero_point_values
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.loading import load_model
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.sessions import expert_session
from edgemoe.runtime.tokenizer import BundleTokenizer


def native_kernel_available(tmp_path) -> bool:
    """Whether this onnxruntime creates a 2-bit MatMulNBits session (checked directly)."""
    weights = [np.ones((32, 32), np.float32)] * 3
    folder = tmp_path / "kernel-probe"
    folder.mkdir(exist_ok=True)
    try:
        expert_session(str(_expert_graph(folder, weights, 4)[0]), prepack=True, quiet=True)
    except Exception:
        return False
    return True


def _expert_graph(tmp_path, weights, accuracy_level, block_size=32):
    """Native and widened graph files of a 2-bit SwiGLU expert over one data file."""
    gate, up, down = weights
    hidden = gate.shape[1]
    g = GraphBuilder("expert")
    x = g.input("x", TensorProto.FLOAT, ["T", hidden])
    y = quantized_swiglu_expert(g, x, gate, up, down, "/expert", 2, block_size, accuracy_level)
    g.output(y, "y", TensorProto.FLOAT, ["T", hidden])
    stem = f"expert_{block_size}_{accuracy_level}"
    native, _, _ = g.save(tmp_path, stem)
    widened, _, _ = widened_copy(g).save(tmp_path, f"{stem}_w4", data_stem=stem)
    return native, widened


def swiglu(x, gate, up, down):
    a = x @ gate.T
    return (a / (1 + np.exp(-a)) * (x @ up.T)) @ down.T


def test_packing_puts_value_i_at_bits_2i():
    values = np.array([[1, 2, 3, 0, 3]], np.uint8)

    packed = pack(values, 2)

    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    np.testing.assert_array_equal(unpack_values(packed, 2, 5), values)


def test_dequantize_is_values_minus_zero_point_times_scale():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 200)).astype(np.float32)  # 200: the last block is padded

    qw = quantize(weight, 2, 32)

    assert qw.packed.shape == (6, 7, 8)
    assert qw.zero_points.shape == (6 * 2,)  # 7 zero points per row, four per byte
    q = unpack(qw).astype(np.float32)
    z = zero_point_values(qw)
    assert q.max() <= 3
    assert z.max() <= 3
    expected = (q - z[..., None]) * qw.scales.reshape(6, 7, 1)
    np.testing.assert_array_equal(dequantize(qw), expected.reshape(6, -1)[:, :200])


def brute_force_block_error(block: np.ndarray) -> float:
    """Smallest squared error over zero points 0..3 and 2000 scales up to the block's range."""
    span = float(block.max() - block.min()) or 1.0
    scales = np.linspace(span / 20, span, 2000, dtype=np.float64)[:, None]
    best = np.inf
    for zero in range(4):
        q = np.clip(np.rint(block / scales + zero), 0, 3)
        best = min(best, float(np.square(block - (q - zero) * scales).sum(axis=1).min()))
    return best


def test_fit_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 256)).astype(np.float32)
    weight[1] = np.abs(weight[1])  # one skewed row: a zero point of 0 fits it best
    weight[2, :32] = 0.0

    qw = quantize(weight, 2, 32)
    error = np.square(dequantize(qw) - weight).reshape(4, 8, 32).sum(axis=-1)

    for row in range(4):
        for block in range(8):
            values = weight[row, block * 32:(block + 1) * 32].astype(np.float64)
            assert error[row, block] <= brute_force_block_error(values) * 1.01 + 1e-9, (row, block)
    assert np.all(dequantize(qw)[2, :32] == 0.0)


def test_fit_beats_symmetric_rounding():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 512)).astype(np.float32)
    blocks = weight.reshape(64, 16, 32)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 1  # symmetric 2-bit: levels -2..1
    rounded = np.clip(np.rint(blocks / scale), -2, 1) * scale

    fitted_error = np.square(dequantize(quantize(weight, 2, 32)) - weight).mean()
    rounded_error = np.square(rounded.reshape(64, -1) - weight).mean()

    # Measured 0.11 vs 0.43 of the weight variance.
    assert fitted_error < 0.15 * np.square(weight).mean()
    assert fitted_error < rounded_error / 3


def test_numpy_widening_repacks_the_same_values():
    rng = np.random.default_rng(4)
    qw = quantize(rng.standard_normal((8, 96)).astype(np.float32), 2, 32)

    widened = widen_2bit(qw.packed, 32)

    assert widened.shape == (8, 3, 16)
    np.testing.assert_array_equal(unpack_values(widened, 4, 32), unpack(qw))


@pytest.mark.parametrize("block_size", [32, 64])
def test_expert_sessions_match_numpy_dequantized(tmp_path, block_size):
    rng = np.random.default_rng(block_size)
    weights = (rng.standard_normal((384, 192)).astype(np.float32) * 0.05,
               rng.standard_normal((384, 192)).astype(np.float32) * 0.05,
               rng.standard_normal((192, 384)).astype(np.float32) * 0.05)
    x = rng.standard_normal((5, 192)).astype(np.float32)
    expected = swiglu(x, *(dequantize(quantize(w, 2, block_size)) for w in weights))
    scale = float(np.abs(expected).max())
    native_level4, widened_level4 = _expert_graph(tmp_path, weights, 4, block_size)
    _, widened_level0 = _expert_graph(tmp_path, weights, 0, block_size)

    # accuracy_level 0 computes in float32: equal to numpy up to summation order.
    exact = expert_session(str(widened_level0), prepack=True).run(None, {"x": x})[0]
    assert float(np.abs(exact - expected).max()) <= 1e-5 * scale
    # accuracy_level 4 (what bundles use) also quantizes x to int8 per block.
    widened = expert_session(str(widened_level4), prepack=True).run(None, {"x": x})[0]
    assert float(np.abs(widened - expected).max()) <= 0.03 * scale
    if native_kernel_available(tmp_path):
        native = expert_session(str(native_level4), prepack=True).run(None, {"x": x})[0]
        np.testing.assert_allclose(native, widened, rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def int2_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("int2") / "demo-int2"
    export_checkpoint(checkpoint_dir(DEMO), out, expert_bits=2, progress=False)
    return out


def test_manifest_lists_both_graphs_of_each_expert(int2_bundle):
    manifest = load_manifest(int2_bundle)

    assert {(e.dtype, e.bits, e.block_size) for e in manifest.experts} == {("int2", 2, 32)}
    for entry in manifest.experts:
        assert entry.widened_file == entry.file.replace(".onnx", "_w4.onnx")
        assert entry.widened_file in manifest.files
        assert entry.data_file in manifest.files
        assert entry.widened_resident_bytes > entry.resident_bytes


def test_widening_follows_the_installed_kernel(int2_bundle, tmp_path):
    engine = Engine(int2_bundle)
    widened = {e.file == e.widened_file for e in engine.manifest.experts}

    assert widened == {not native_kernel_available(tmp_path)}
    resident = {e.resident_bytes == e.widened_resident_bytes for e in engine.manifest.experts}
    assert resident == widened


def test_widened_bundle_equals_native(int2_bundle, tmp_path):
    if not native_kernel_available(tmp_path):
        pytest.skip(f"onnxruntime {ort.__version__} has no 2-bit kernel to compare against; "
                    "test_expert_sessions_match_numpy_dequantized checks the widened graph alone")
    prompt = np.arange(1, 17)
    logits = {}
    for widen in (False, True):
        engine = Engine(int2_bundle, EngineOptions(widen_2bit=widen, predictor=None, preload=False))
        logits[widen] = engine.forward(prompt, engine.new_cache(), all_logits=True)

    # Equal up to summation order (measured 1.2e-5 on logits of about 10).
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-4)


def test_percentage_budget_counts_widened_sizes(int2_bundle):
    model = load_model(int2_bundle, "100%", widen_2bit=True, predictor=None, preload=False)
    widened_total = sum(e.widened_resident_bytes for e in load_manifest(int2_bundle).experts)

    assert model.engine.manifest.expert_bytes == widened_total
    assert model.engine.store.budget_bytes == widened_total


def test_bench_notes_widening(int2_bundle, run_cli, tmp_path):
    completed = run_cli(["bench", int2_bundle, "--budgets", "100%", "--modes", "lru", "--repeat", "1",
                         "--max-tokens", "4"])

    assert completed.returncode == 0, completed.stderr
    noted = "2-bit experts of" in completed.stdout and "are widened to 4 bits" in completed.stdout
    assert noted == (not native_kernel_available(tmp_path))


LOG_SCRIPT = """
import logging, sys
import numpy as np
from edgemoe.runtime.engine import Engine
logging.basicConfig(level=logging.INFO)
for _ in range(2):
    engine = Engine(sys.argv[1])
    engine.forward(np.array([1, 2, 3]), engine.new_cache())
"""


def test_widening_is_logged_once(int2_bundle, tmp_path):
    completed = subprocess.run([sys.executable, "-c", LOG_SCRIPT, str(int2_bundle)],
                               capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if "no 2-bit MatMulNBits kernel" in line]
    assert len(lines) == (0 if native_kernel_available(tmp_path) else 1), completed.stderr


def test_int2_bundle_is_small_and_close_to_fp32(int2_bundle, bundle_path, corpus_path, tmp_path):
    int4 = tmp_path / "demo-int4"
    export_checkpoint(checkpoint_dir(DEMO), int4, expert_bits=4, progress=False)
    data = {}
    for name, bundle in (("int2", int2_bundle), ("int4", int4)):
        manifest = load_manifest(bundle)
        data[name] = sum(manifest.files[e.data_file].bytes for e in manifest.experts)
    # 2 bits per weight + a float32 scale per 32 weights + a 2-bit zero point: 3.06 bits, 0.61 x int4's 5.
    assert data["int2"] <= 0.65 * data["int4"], data

    text = corpus_path.read_text(encoding="utf-8")[:20000]
    scores = {}
    for name, bundle in (("fp32", bundle_path(DEMO)), ("int2", int2_bundle)):
        engine = Engine(bundle)
        scores[name] = evaluate(engine, BundleTokenizer(bundle, engine.manifest), text, window=256).perplexity
    assert scores["fp32"] < scores["int2"] <= scores["fp32"] * 1.25, scores
