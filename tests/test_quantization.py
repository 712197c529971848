"""Integer experts (`--expert-bits 8` and `4`, and `auto`): packing, graphs, bundles and their
checks. The 2-bit format has its own file, test_two_bit.py.

Invariants checked:
- quantize + dequantize equals a per-block numpy reference of symmetric rounding exactly, and
  every weight moves by at most half its block's scale.
- A quantized expert session at accuracy_level 0 (float32 compute) matches the numpy SwiGLU on
  the dequantized weights within 1e-5 of max|y|. The exported graphs use accuracy_level 4, which
  quantizes the activations to int8 per block as well; they stay within 3 % of max|y| (measured
  1.2 % for int4 and int8 at block size 32 with onnxruntime 1.32 on x86_64).
- An int4 demo bundle's expert data files are at most 1/6 of the fp32 ones. 4 bits per weight
  plus a float32 scale per 32 weights is 5 bits, 1/6.4 of 32. Its perplexity is within 1 % of
  fp32's.
- `--expert-bits auto` puts the least important experts at the lower of the two widths whose
  uniform perplexities bracket the limit, keeps the calibration perplexity within the budget
  and records its measurements in the manifest. Without --calibration it uses the built-in
  text, which shares no paragraph with the evaluation corpus.
- The integer accounting is at least the RSS growth of loading every expert.
- A manifest entry whose width differs from its expert graph fails at load with the file name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import DEMO, checkpoint_dir
from edgemoe.export.layers import quantized_swiglu_expert
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.export.quantize import dequantize, quantize, unpack
from edgemoe.export.writer import _auto_request, export_checkpoint
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.demo import DEMO_CALIBRATION
from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.manifest import MANIFEST_NAME, BundleError, load_manifest, sha256_file
from edgemoe.runtime.sessions import expert_session
from edgemoe.runtime.tokenizer import BundleTokenizer

ORT_VERSION = tuple(int(part) for part in ort.__version__.split(".")[:2])
FORMATS = [(4, 32), (4, 128), (8, 32), (8, 16)]


def reference_quantize(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed integers [N, K] and scales [N, blocks], one block at a time."""
    n, k = weight.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = -(-k // block_size)
    q = np.zeros((n, k), np.int64)
    scales = np.zeros((n, blocks), np.float32)
    for row in range(n):
        for b in range(blocks):
            block = weight[row, b * block_size:(b + 1) * block_size]
            absmax = np.abs(block).max()
            scale = np.float32(absmax / qmax) if absmax > 0 else np.float32(1.0)
            scales[row, b] = scale
            q[row, b * block_size:(b + 1) * block_size] = np.clip(np.rint(block / scale), -qmax - 1, qmax)
    return q, scales


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    a = x @ gate.T
    return (a / (1 + np.exp(-a)) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("bits,block_size", FORMATS)
def test_round_trip_matches_reference(bits, block_size):
    rng = np.random.default_rng(bits * 1000 + block_size)
    weight = rng.standard_normal((24, 200)).astype(np.float32)  # 200 is not a multiple of any block size
    weight[3, :block_size] = 0.0  # an all-zero block

    qw = quantize(weight, bits, block_size)
    q, scales = reference_quantize(weight, bits, block_size)

    stored = unpack(qw).reshape(24, -1)[:, :200].astype(np.int64) - 2 ** (bits - 1)
    np.testing.assert_array_equal(stored, q)
    np.testing.assert_array_equal(qw.scales, scales.reshape(-1))
    expected = q * np.repeat(scales, block_size, axis=1)[:, :200]
    np.testing.assert_array_equal(dequantize(qw), expected.astype(np.float32))
    step = np.repeat(scales, block_size, axis=1)[:, :200]
    assert np.all(np.abs(dequantize(qw) - weight) <= step / 2 + 1e-7)
    assert np.all(dequantize(qw)[3, :block_size] == 0.0)


def test_int4_packs_two_values_per_byte():
    weight = np.array([[-7.0, 7.0] + [0.0] * 30], np.float32)  # scale 1: q = -7, 7, 0, ...

    qw = quantize(weight, 4, 32)

    assert qw.packed.shape == (1, 1, 16)
    assert qw.packed[0, 0, 0] == (-7 + 8) | ((7 + 8) << 4)
    assert qw.packed[0, 0, 1] == 8 | (8 << 4)


def test_invalid_block_size_names_choices():
    with pytest.raises(ValueError, match="invalid block size 48; choose one of 16, 32, 64, 128, 256"):
        quantize(np.ones((2, 64), np.float32), 4, 48)


def _expert_graph(tmp_path, weights, bits, block_size, accuracy_level):
    gate, up, down = weights
    hidden = gate.shape[1]
    g = GraphBuilder("expert")
    x = g.input("x", TensorProto.FLOAT, ["T", hidden])
    y = quantized_swiglu_expert(g, x, gate, up, down, "/expert", bits, block_size, accuracy_level)
    g.output(y, "y", TensorProto.FLOAT, ["T", hidden])
    path, _, _ = g.save(tmp_path, f"expert_{bits}_{block_size}_{accuracy_level}")
    return path


@pytest.mark.parametrize("bits,block_size", FORMATS)
def test_expert_session_matches_numpy_dequantized(tmp_path, bits, block_size):
    rng = np.random.default_rng(7)
    weights = (rng.standard_normal((384, 192)).astype(np.float32) * 0.05,
               rng.standard_normal((384, 192)).astype(np.float32) * 0.05,
               rng.standard_normal((192, 384)).astype(np.float32) * 0.05)
    x = rng.standard_normal((5, 192)).astype(np.float32)
    dequantized = [dequantize(quantize(w, bits, block_size)) for w in weights]
    expected = swiglu(x, *dequantized)
    scale = float(np.abs(expected).max())

    fast = expert_session(str(_expert_graph(tmp_path, weights, bits, block_size, 4)), prepack=True)
    fast_error = float(np.abs(fast.run(None, {"x": x})[0] - expected).max())
    assert fast_error <= 0.03 * scale, f"accuracy_level 4: max-abs error {fast_error:.3g}, max|y| {scale:.3g}"

    # onnxruntime 1.22 raises "Only 4b quantization is supported for unpacked compute" for 8 bits at
    # accuracy_level 0; 1.32 runs it. Versions in between were not tried.
    if bits == 8 and ORT_VERSION < (1, 32):
        return
    exact = expert_session(str(_expert_graph(tmp_path, weights, bits, block_size, 0)), prepack=True)
    exact_error = float(np.abs(exact.run(None, {"x": x})[0] - expected).max())
    assert exact_error <= 1e-5 * scale, f"accuracy_level 0: max-abs error {exact_error:.3g}, max|y| {scale:.3g}"


@pytest.fixture(scope="module")
def int_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("int-bundles")
    bundles = {}
    for bits in (8, 4, 2):
        bundles[bits] = root / f"demo-int{bits}"
        export_checkpoint(checkpoint_dir(DEMO), bundles[bits], expert_bits=bits, progress=False)
    return bundles


def test_manifest_records_bits_and_block_size(int_bundles):
    for bits, bundle in int_bundles.items():
        manifest = load_manifest(bundle)
        assert {e.bits for e in manifest.experts} == {bits}
        assert {e.block_size for e in manifest.experts} == {32}
        assert {e.dtype for e in manifest.experts} == {f"int{bits}"}
        assert manifest.dtype == "fp32"


def test_int4_expert_data_shrinks(int_bundles, bundle_path):
    fp32 = load_manifest(bundle_path(DEMO))
    int4 = load_manifest(int_bundles[4])

    fp32_data = sum(fp32.files[e.data_file].bytes for e in fp32.experts)
    int4_data = sum(int4.files[e.data_file].bytes for e in int4.experts)

    assert int4_data <= fp32_data / 6, f"int4 {int4_data} bytes, fp32 {fp32_data} bytes"


def test_expert_bits_16_stores_fp16_experts(tmp_path):
    out = tmp_path / "demo-fp16-experts"
    export_checkpoint(checkpoint_dir(DEMO), out, expert_bits=16, progress=False)
    manifest = load_manifest(out)

    assert manifest.dtype == "fp32"
    assert {e.dtype for e in manifest.experts} == {"fp16"}
    assert {e.bits for e in manifest.experts} == {None}


@pytest.mark.parametrize("bits", [8, 4])
def test_int_bundle_perplexity_near_fp32(int_bundles, bundle_path, corpus_path, bits):
    text = corpus_path.read_text(encoding="utf-8")[:20000]
    scores = {}
    for name, bundle in (("fp32", bundle_path(DEMO)), ("int", int_bundles[bits])):
        engine = Engine(bundle)
        scores[name] = evaluate(engine, BundleTokenizer(bundle, engine.manifest), text, window=256).perplexity

    assert scores["int"] <= scores["fp32"] * 1.01, scores
    assert scores["int"] >= scores["fp32"] * 0.99, scores


def test_width_mismatch_fails_at_expert_load(int_bundles, tmp_path):
    # An int4 bundle whose expert 0 of layer 0 files were replaced by the int8 ones, with the
    # file sizes and sha256 updated, so only the width disagrees with the manifest.
    bundle = tmp_path / "mixed"
    shutil.copytree(int_bundles[4], bundle)
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    entry = next(e for e in raw["experts"] if e["layer"] == 0 and e["index"] == 0)
    for name in (entry["file"], entry["data_file"]):
        shutil.copyfile(int_bundles[8] / name, bundle / name)
        raw["files"][name] = {"bytes": (bundle / name).stat().st_size, "sha256": sha256_file(bundle / name)}
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    manifest = load_manifest(bundle)
    store = ExpertStore(bundle, manifest, manifest.expert_bytes)

    with pytest.raises(BundleError, match=r"l00_e000\.onnx stores int8, block size 32 but manifest.json "
                                          r"lists int4, block size 32"):
        store.acquire(0, 0)


RSS_SCRIPT = """
import sys
import numpy as np
from edgemoe.runtime.demo import DEMO_CALIBRATION
from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.kernels import adapt_experts
from edgemoe.runtime.manifest import load_manifest

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

bundle = sys.argv[1]
manifest = load_manifest(bundle)
manifest.experts = adapt_experts(bundle, manifest.experts)  # 2-bit experts widened without a kernel
manifest.__post_init__()
store = ExpertStore(bundle, manifest, manifest.expert_bytes, verify=False)
x = np.zeros((1, manifest.config.hidden_size), np.float32)
entries = manifest.experts
session = store.acquire(entries[0].layer, entries[0].index)  # the first load sets up onnxruntime
session.run(None, {"x": x})
before = rss()
for entry in entries[1:]:
    store.acquire(entry.layer, entry.index).run(None, {"x": x})
print(rss() - before, sum(e.resident_bytes for e in entries[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads RSS from /proc/self/statm (Linux)")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int_expert_rss_within_accounting(int_bundles, bits):
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(int_bundles[bits])],
                            capture_output=True, text=True, timeout=120, check=True)
    measured, accounted = map(int, result.stdout.split())

    # The accounting rounds the measured prepacking factors up, so it may exceed RSS a little,
    # but it must not undercount it (that would let a budget overcommit memory).
    assert measured <= accounted, f"RSS grew {measured} bytes, accounted {accounted}"
    assert measured >= accounted * 0.7, f"RSS grew {measured} bytes, accounted {accounted}"


@pytest.fixture(scope="module")
def auto_bundle(tmp_path_factory, corpus_path):
    root = tmp_path_factory.mktemp("auto-bundle")
    calibration = root / "calibration.txt"
    calibration.write_text(corpus_path.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    out = root / "demo-auto"
    # 0.2 % lies between two adjacent uniform widths on this text, so the search lowers some
    # experts only (test_auto_records_perplexities_within_budget checks that it does).
    export_checkpoint(checkpoint_dir(DEMO), out, expert_bits="auto", quality_budget=0.002,
                      calibration=calibration, progress=False)
    return out


def test_auto_lowers_least_important_experts(auto_bundle):
    manifest = load_manifest(auto_bundle)
    record = manifest.quantization
    low = [e for e in manifest.experts if (e.bits or 16) == record["low_bits"]]
    high = [e for e in manifest.experts if (e.bits or 16) == record["high_bits"]]

    assert record["high_bits"] > record["low_bits"]
    assert len(low) + len(high) == len(manifest.experts) == 48
    assert all(e.importance is not None for e in manifest.experts)
    assert record["experts_at_low_bits"] == len(low)
    assert 0 < len(low) < 48, record
    assert max(e.importance for e in low) <= min(e.importance for e in high)


def test_auto_records_perplexities_within_budget(auto_bundle):
    record = load_manifest(auto_bundle).quantization
    perplexity = record["perplexity"]
    name = {16: "fp16", 8: "int8", 4: "int4", 2: "int2"}

    assert record["quality_budget"] == 0.002
    assert set(perplexity) == {"fp16", "int8", "int4", "int2", "mix"}
    assert record["perplexity_limit"] == pytest.approx(perplexity["fp16"] * 1.002)
    # The chosen widths bracket the limit and are adjacent candidates.
    assert perplexity[name[record["high_bits"]]] <= record["perplexity_limit"] < perplexity[name[record["low_bits"]]]
    assert record["candidate_bits"].index(record["low_bits"]) == record["candidate_bits"].index(record["high_bits"]) + 1
    assert perplexity["mix"] <= record["perplexity_limit"]


def test_auto_bundle_keeps_only_chosen_files(auto_bundle):
    manifest = load_manifest(auto_bundle)
    listed = {name for e in manifest.experts for name in (e.file, e.data_file, e.widened_file) if name}
    on_disk = {f"experts/{p.name}" for p in (auto_bundle / "experts").iterdir()}

    assert on_disk == listed
    engine = Engine(auto_bundle)
    logits = engine.forward(np.arange(1, 9), engine.new_cache())
    assert np.all(np.isfinite(logits))


def test_auto_defaults_to_built_in_calibration_text(corpus_path):
    request = _auto_request(0.02, None)
    eval_text = corpus_path.read_text(encoding="utf-8")
    long_paragraphs = [p for p in request.text.split("\n\n") if len(p) > 60]

    assert request.calibration == DEMO_CALIBRATION
    assert len(request.text) > 10_000
    assert len(long_paragraphs) > 20
    assert not [p for p in long_paragraphs if p in eval_text], "calibration text overlaps the eval corpus"


def test_auto_uses_context_when_shorter_than_window(corpus_path, tmp_path):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(corpus_path.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out = tmp_path / "tiny-auto"

    export_checkpoint(checkpoint_dir("tiny-deepseek-v3"), out, expert_bits="auto", calibration=calibration,
                      progress=False)

    manifest = load_manifest(out)
    assert manifest.quantization["calibration_window"] == manifest.config.max_position_embeddings == 128


def test_auto_rejects_short_calibration(tmp_path):
    calibration = tmp_path / "short.txt"
    calibration.write_text("Once upon a time there was a cat.", encoding="utf-8")

    with pytest.raises(ValueError, match=r"short\.txt has 9 tokens; --expert-bits auto needs at least 256"):
        export_checkpoint(checkpoint_dir(DEMO), tmp_path / "out", expert_bits="auto", calibration=calibration,
                          progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--calibration", "missing.txt"], ["--quality-budget", "5%"]])
def test_cli_rejects_auto_flags_without_auto(run_cli, tmp_path, flags):
    result = run_cli(["export", checkpoint_dir(DEMO), tmp_path / "out", "--expert-bits", "4", *flags])

    assert result.returncode == 1
    assert f"{flags[0]} apply only with --expert-bits auto" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_export_int4_with_block_size(run_cli, tmp_path):
    out = tmp_path / "demo-int4-b64"
    result = run_cli(["export", checkpoint_dir(DEMO), out, "--expert-bits", "4", "--block-size", "64"])

    assert result.returncode == 0, result.stderr
    assert "experts int4" in result.stdout
    manifest = load_manifest(out)
    assert {(e.dtype, e.bits, e.block_size) for e in manifest.experts} == {("int4", 4, 64)}


def test_cli_rejects_block_size_48(run_cli, tmp_path):
    result = run_cli(["export", checkpoint_dir(DEMO), tmp_path / "out", "--expert-bits", "4", "--block-size", "48"])

    assert result.returncode == 2
    assert "invalid choice: 48" in result.stderr


def test_export_does_not_import_onnxruntime():
    # The Docker image exports the demo model during an emulated build, where importing
    # onnxruntime crashes, so a plain export must not need it.
    code = ("import sys; from edgemoe.export.writer import export_checkpoint; "
            "print('onnxruntime' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"
