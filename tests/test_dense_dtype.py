"""`--dense-dtype` sets the precision of the resident weights, independently of `--dtype`.

Invariants checked:
- int8 dense weights are 8-bit MatMulNBits nodes at accuracy_level 4, and routers stay float32.
- The int8 demo bundle's perplexity stays within DEMO_PERPLEXITY_TOLERANCE of the fp32 one.
- The quantized weights take at most 0.3x their float32 bytes (1 byte per value plus one float32
  scale per 32 values is 0.28x).
- Every tiny family exports and runs with int8 dense weights, with logits close to the fp32
  bundle's (DENSE_INT8_MEAN_ABS).
- The manifest records the dense precision, and a manifest without the field loads as `dtype`.
- The CLI lists the choices and rejects a bad value.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import DEMO, TINY_MODELS, checkpoint_dir
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.manifest import MANIFEST_NAME, load_manifest
from edgemoe.runtime.tokenizer import BundleTokenizer

# Measured with onnxruntime 1.32 on x86_64 over tests/fixtures/tinystories-eval.txt at window
# 256: fp32 perplexity 22.597, int8 dense 22.591 (-0.03 %). 0.5 % leaves a margin of more than
# 10x and stays well inside the 2 % quality budget used for experts.
DEMO_PERPLEXITY_TOLERANCE = 0.005
# Quantized bytes (packed values + scales) over the same weights' float32 bytes.
MAX_QUANTIZED_RATIO = 0.3
# Mean-abs difference between the int8-dense and the fp32 bundles' logits over the prompt
# positions. The tiny random models amplify weight rounding (fp16 alone moves their logits by
# up to 0.14 max-abs, see test_parity), and 8-bit blocks round about 16x coarser than fp16. A
# changed top-k choice of a router also makes a logit row jump. Measured with onnxruntime 1.32
# on x86_64: 0.036 (granitemoe), 0.045 (qwen3-moe), 0.071 (deepseek-v3), 0.078 (olmoe), 0.081
# (mixtral), 0.120 (deepseek-v2), 0.150 (both gpt-oss), 0.285 (qwen2-moe, 4 dense MLP layers
# and 2 shared experts, all quantized) and 0.551 (phimoe, whose sparsemixer routing flips
# often). The bounds leave a margin of 2x over the largest of each group. A graph that
# dropped a bias or mixed up a projection moves the logits by about their std (2).
DENSE_INT8_MEAN_ABS = {model: 0.3 for model in TINY_MODELS} | {"tiny-qwen2-moe": 0.6, "tiny-phimoe": 1.1}


def _initializer_bytes(graph_path) -> dict[str, int]:
    model = onnx.load(str(graph_path), load_external_data=False)
    sizes = {}
    for tensor in model.graph.initializer:
        length = {entry.key: entry.value for entry in tensor.external_data}.get("length")
        if length is not None:
            sizes[tensor.name] = int(length)
    return sizes


def _dense_graphs(bundle) -> list:
    manifest = load_manifest(bundle)
    return [bundle / manifest.graphs["embed"], *(bundle / p for p in manifest.graphs["layers"]),
            bundle / manifest.graphs["head"]]


def test_int8_dense_uses_matmulnbits(bundle_path):
    bundle = bundle_path(DEMO, "fp32", "int8")
    layer = onnx.load(str(bundle / load_manifest(bundle).graphs["layers"][0]), load_external_data=False)

    quantized = [n for n in layer.graph.node if n.op_type == "MatMulNBits"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in quantized[0].attribute}
    routers = [t for t in layer.graph.initializer if "/router" in t.name]
    assert {n.name.split("/")[3] for n in quantized} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert attributes["bits"] == 8
    assert attributes["accuracy_level"] == 4
    assert attributes["block_size"] == 32
    assert routers
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in routers)


def test_int8_dense_demo_perplexity(bundle_path, corpus_path):
    text = corpus_path.read_text(encoding="utf-8")
    perplexities = {}
    for dense_dtype in ("fp32", "int8"):
        bundle = bundle_path(DEMO, "fp32", dense_dtype)
        engine = Engine(bundle)
        perplexities[dense_dtype] = evaluate(engine, BundleTokenizer(bundle, engine.manifest), text).perplexity

    change = perplexities["int8"] / perplexities["fp32"] - 1
    assert abs(change) <= DEMO_PERPLEXITY_TOLERANCE, f"perplexity {perplexities}: {change * 100:+.2f} %"


def test_int8_dense_quantized_bytes(bundle_path):
    fp32_graphs = _dense_graphs(bundle_path(DEMO, "fp32"))
    int8_graphs = _dense_graphs(bundle_path(DEMO, "fp32", "int8"))
    float_bytes = quantized_bytes = 0
    for fp32_graph, int8_graph in zip(fp32_graphs, int8_graphs):
        fp32_sizes, int8_sizes = _initializer_bytes(fp32_graph), _initializer_bytes(int8_graph)
        for name, size in int8_sizes.items():
            if name.endswith(".weight_packed"):
                scope = name.removesuffix(".weight_packed")
                quantized_bytes += size + int8_sizes[f"{scope}.weight_scales"]
                # The fp32 tied head reads the embedding table, which has the same shape.
                float_bytes += fp32_sizes.get(f"{scope}.weight", fp32_sizes.get("embed_tokens.weight"))

    assert quantized_bytes > 0
    assert quantized_bytes <= MAX_QUANTIZED_RATIO * float_bytes, f"{quantized_bytes} of {float_bytes} bytes"


def test_int8_dense_tied_head_has_own_copy(bundle_path):
    bundle = bundle_path(DEMO, "fp32", "int8")
    head = onnx.load(str(bundle / load_manifest(bundle).graphs["head"]), load_external_data=False)

    locations = {entry.value for tensor in head.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    assert locations == {"head.bin"}
    assert "MatMulNBits" in {n.op_type for n in head.graph.node}


@pytest.mark.parametrize("model", TINY_MODELS)
def test_int8_dense_close_to_fp32(model, bundle_path, load_reference):
    reference = load_reference(model)
    ids = np.asarray(reference.prompt_ids)
    logits = {}
    for dense_dtype in ("fp32", "int8"):
        engine = Engine(bundle_path(model, "fp32", dense_dtype))
        logits[dense_dtype] = engine.forward(ids, engine.new_cache(), all_logits=True)

    mean_abs = float(np.abs(logits["int8"] - logits["fp32"]).mean())
    assert np.isfinite(logits["int8"]).all()
    assert mean_abs <= DENSE_INT8_MEAN_ABS[model], f"mean-abs logit difference {mean_abs:.3g}"


def test_manifest_records_dense_dtype(bundle_path):
    assert load_manifest(bundle_path(DEMO, "fp32", "int8")).dense_dtype == "int8"
    assert load_manifest(bundle_path(DEMO, "fp32")).dense_dtype == "fp32"


def test_manifest_without_dense_dtype_loads(tmp_path):
    bundle = tmp_path / "bundle"
    export_checkpoint(checkpoint_dir("tiny-mixtral"), bundle, dtype="fp16", progress=False)
    path = bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    del raw["dense_dtype"]
    path.write_text(json.dumps(raw))

    assert load_manifest(bundle).dense_dtype == "fp16"


def test_fp16_dense_with_fp32_experts(tmp_path):
    bundle = tmp_path / "bundle"
    summary = export_checkpoint(checkpoint_dir("tiny-mixtral"), bundle, dense_dtype="fp16", progress=False)
    manifest = load_manifest(bundle)
    layer = onnx.load(str(bundle / manifest.graphs["layers"][0]), load_external_data=False)
    expert = onnx.load(str(bundle / manifest.experts[0].file), load_external_data=False)

    assert summary.dense_dtype == "fp16"
    assert "dense fp16" in summary.describe()
    assert {t.data_type for t in layer.graph.initializer if t.external_data} == {onnx.TensorProto.FLOAT16}
    assert {t.data_type for t in expert.graph.initializer if t.external_data} == {onnx.TensorProto.FLOAT}
    assert {e.dtype for e in manifest.experts} == {"fp32"}


def test_export_rejects_bad_dense_dtype(tmp_path):
    with pytest.raises(ValueError, match="invalid dense dtype 'int4'; choose one of fp32, fp16, int8"):
        export_checkpoint(checkpoint_dir("tiny-mixtral"), tmp_path / "bundle", dense_dtype="int4", progress=False)


def test_cli_dense_dtype_help_and_bad_value(run_cli, tmp_path):
    help_text = run_cli(["export", "--help"])
    bad = run_cli(["export", checkpoint_dir("tiny-mixtral"), tmp_path / "bundle", "--dense-dtype", "int4"])

    assert help_text.returncode == 0
    assert "--dense-dtype {fp32,fp16,int8}" in help_text.stdout
    assert bad.returncode == 2
    assert "invalid choice: 'int4'" in bad.stderr
    assert not (tmp_path / "bundle").exists()


def test_cli_export_summary_shows_dense_dtype(run_cli, tmp_path):
    result = run_cli(["export", checkpoint_dir("tiny-mixtral"), tmp_path / "bundle", "--dense-dtype", "int8"])

    assert result.returncode == 0, result.stderr
    assert "(fp32, dense int8)" in result.stdout
