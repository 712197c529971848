"""Hugging Face checkpoint -> edgemoe bundle.

The bundle is written into `OUT.partial-PID` next to OUT and renamed when complete, so a failed or
interrupted export never leaves a half-written bundle under the requested name.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe.export.architectures import architecture_for
from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.export.layers import widened_copy
from edgemoe.export.quantize import AUTO_CANDIDATE_BITS, DEFAULT_BLOCK_SIZE, check_block_size
from edgemoe.runtime.demo import DEMO_CALIBRATION
from edgemoe.runtime.manifest import (FORMAT_VERSION, MANIFEST_NAME, ExpertEntry, FileEntry, Manifest,
                                      sha256_file)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
# --dense-dtype values: fp32 and fp16 store the resident weights as floats, int8 stores their
# linear weights as blocked 8-bit integers (routers, norms and the embedding table stay float).
DENSE_DTYPES = ("fp32", "fp16", "int8")
DENSE_BITS = {"int8": 8}
# Heap memory of one expert session beyond its weights: about 150 KB measured for the demo
# model's experts (H=192, I=384) with onnxruntime 1.32 on x86_64, rounded up.
SESSION_OVERHEAD_BYTES = 160 * 1024
# --expert-bits values: 16 stores fp16 experts, 8, 4 and 2 store blocked integer experts.
EXPERT_BITS = (16, 8, 4, 2)
# Beyond its overhead, a quantized expert's session keeps a prepacked copy of the packed weights
# and the pages of the data file that prepacking read. Measured RSS growth per session over the
# data file, block size 32, onnxruntime 1.32 (1.22.1) on x86_64, demo shape (H=192, I=384) and
# H=2048, I=1024: int8 1.27 (1.18) and 1.23; int4 1.50 (1.34) and 1.47 (1.46); int2 2.31 and
# 1.66. Rounded up here.
PREPACKED_FACTOR = {8: 1.4, 4: 1.6, 2: 2.4}
# A 2-bit expert widened to 4 bits at load (onnxruntime without a 2-bit kernel) also keeps the
# 4-bit values: 5.21 x (demo shape) and 6.08 x (H=2048, I=1024) the data file with onnxruntime
# 1.22.1, 4.36 x and 3.55 x with 1.32. Rounded up from the largest.
WIDENED_2BIT_FACTOR = 6.2
DEFAULT_QUALITY_BUDGET = 0.02  # --expert-bits auto: calibration perplexity increase over fp16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


@dataclass
class ExportSummary:
    """Summary of one export: sizes, layout and duration."""

    bundle: str
    architecture: str
    dtype: str
    expert_dtype: str  # "fp32", "fp16", "int8", "int4", "int2" or "auto"
    dense_dtype: str  # "fp32", "fp16" or "int8"
    layers: int
    moe_layers: int  # layers with routed experts; the others are dense MLP layers
    experts_per_layer: int  # routed experts of each MoE layer
    # embedding, attention, routers, norms, LM head, shared experts, dense layers' MLPs
    dense_bytes: int
    expert_bytes: int  # all routed expert graphs and their weights, as stored
    seconds: float

    def describe(self) -> str:
        mb = 1e6
        if self.moe_layers == self.layers:
            shape = f"{self.layers} layers x {self.experts_per_layer} experts"
        else:
            shape = f"{self.layers} layers ({self.moe_layers} MoE x {self.experts_per_layer} experts)"
        parts = [self.dtype]
        if self.dense_dtype != self.dtype:
            parts.append(f"dense {self.dense_dtype}")
        if self.expert_dtype != self.dtype:
            parts.append(f"experts {self.expert_dtype}")
        dtypes = ", ".join(parts)
        return (f"exported {self.architecture} ({dtypes}) to {self.bundle}: {shape}; dense "
                f"{self.dense_bytes / mb:.1f} MB, experts {self.expert_bytes / mb:.1f} MB; {self.seconds:.1f} s")


def export_checkpoint(source: str | Path, out: str | Path, dtype: str = "fp32",
                      overwrite: bool = False, progress: bool = True, expert_bits: int | str | None = None,
                      block_size: int = DEFAULT_BLOCK_SIZE, quality_budget: float = DEFAULT_QUALITY_BUDGET,
                      calibration: str | Path | None = None, dense_dtype: str | None = None) -> ExportSummary:
    """Export a Hugging Face MoE checkpoint directory to an edgemoe bundle.

    Args:
        source: checkpoint directory (config.json, safetensors weights, tokenizer.json).
        out: bundle directory to create.
        dtype: storage precision of the weights, "fp32" or "fp16".
        dense_dtype: precision of the resident weights (attention, shared experts, dense
            layers' MLPs, LM head, embedding table): None (same as `dtype`), "fp32", "fp16" or
            "int8". int8 stores the linear weights as 8-bit integers with one float32 scale per
            `block_size` inputs. The embedding table, routers, norms and biases stay float,
            in `dtype`'s precision, and biases in float32.
        expert_bits: precision of the routed experts: None (same as `dtype`), 16 (fp16), 8, 4 or 2
            (blocked integers with one float32 scale per `block_size` inputs, and for 2 bits an
            integer zero point per block).
            "auto" picks fp16, 8, 4 or 2 bits per expert on the `calibration` text (see auto_bits).
        block_size: values per quantization scale, a power of 2 from 16 to 256, for integer
            experts and int8 dense weights.
        quality_budget: with "auto", the allowed calibration perplexity increase over uniform
            fp16, as a fraction (0.02 is 2 %).
        calibration: with "auto", a UTF-8 text file to measure perplexity on (default: the
            built-in text sampled from the demo model).
        overwrite: replace an existing bundle at `out`.
        progress: show a progress bar on stderr.

    Raises:
        CheckpointError: missing files or tensors in the checkpoint.
        UnsupportedConfigError: a model_type or config option edgemoe cannot export.
        FileExistsError: `out` exists and `overwrite` is false.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    dense_dtype = dtype if dense_dtype is None else dense_dtype
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"invalid dense dtype {dense_dtype!r}; choose one of {', '.join(DENSE_DTYPES)}")
    if expert_bits is not None and expert_bits not in (*EXPERT_BITS, "auto"):
        raise ValueError(f"invalid expert bits {expert_bits!r}; choose one of "
                         f"{', '.join(map(str, EXPERT_BITS))} or auto")
    check_block_size(block_size)
    auto = None
    if expert_bits == "auto":
        auto = _auto_request(quality_budget, calibration)
        expert_format = ExpertFormat("auto")
    else:
        expert_format = _expert_format(dtype, expert_bits, block_size)
    out = Path(out)
    _check_output(Path(source), out, overwrite)
    checkpoint = Checkpoint(source)
    if not (checkpoint.directory / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer.json not found in {checkpoint.directory}; edgemoe needs the "
                              "fast-tokenizer file that Hugging Face tokenizers save")
    arch = architecture_for(checkpoint)
    arch.check_tensors()
    if auto:
        _check_calibration_length(auto, checkpoint.directory / "tokenizer.json")
    arch.dense_bits = DENSE_BITS.get(dense_dtype)
    arch.dense_block_size = block_size if arch.dense_bits else None

    # One partial directory per process, so two exports to the same OUT never mix their files.
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _write_bundle(arch, checkpoint, partial, dtype, expert_format, progress,
                                 block_size=block_size, auto=auto, dense_dtype=dense_dtype)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            partial.rename(out)
        except OSError:
            if not (out / MANIFEST_NAME).is_file():
                raise
            # Another process finished the same export first; its bundle is used.
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    cfg = manifest.config
    expert_files = {name for e in manifest.experts for name in (e.file, e.data_file, e.widened_file) if name}
    summary = ExportSummary(
        bundle=str(out), architecture=arch.model_type, dtype=dtype, expert_dtype=expert_format.dtype,
        dense_dtype=dense_dtype,
        layers=cfg.num_hidden_layers,
        moe_layers=sum(arch.config.moe_layers), experts_per_layer=cfg.num_experts,
        dense_bytes=manifest.dense_bytes,
        expert_bytes=sum(manifest.files[f].bytes for f in expert_files),
        seconds=time.perf_counter() - started)
    logger.info(summary.describe())
    return summary


@dataclass
class ExpertFormat:
    """Storage format of the routed experts."""

    dtype: str  # "fp32", "fp16", "int8", "int4", or "auto" (chosen per expert)
    bits: int | None = None  # 8 or 4 for integer experts
    block_size: int | None = None


@dataclass
class AutoRequest:
    quality_budget: float
    calibration: Path
    text: str


def _auto_request(quality_budget: float, calibration: str | Path | None) -> AutoRequest:
    if calibration is None:
        calibration = DEMO_CALIBRATION
        logger.info("calibrating on the built-in text %s (children's stories in English); pass "
                    "--calibration FILE with text in the style of the model's use", calibration)
    if not 0 < quality_budget <= 1:
        raise ValueError(f"invalid quality budget {quality_budget * 100:.10g} %; choose a value above 0 % "
                         "and at most 100 %, such as 2%")
    path = Path(calibration)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the calibration text {path}: {exc}; pass a UTF-8 text file") from exc
    return AutoRequest(quality_budget, path, text)


# Fewer calibration tokens make the perplexities too noisy to rank experts (with 3 tokens,
# uniform int2 once scored better than fp16).
MIN_CALIBRATION_TOKENS = 256


def _check_calibration_length(auto: AutoRequest, tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    tokens = len(Tokenizer.from_file(str(tokenizer_file)).encode(auto.text, add_special_tokens=False).ids)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ValueError(f"the calibration text {auto.calibration} has {tokens} tokens; --expert-bits auto needs "
                         f"at least {MIN_CALIBRATION_TOKENS} (a few thousand rank experts better): pass a longer "
                         "--calibration file")


def _expert_format(dtype: str, expert_bits: int | None, block_size: int) -> ExpertFormat:
    if expert_bits is None:
        return ExpertFormat(dtype)
    if expert_bits == 16:
        return ExpertFormat("fp16")
    return ExpertFormat(f"int{expert_bits}", expert_bits, block_size)


def _check_output(source: Path, out: Path, overwrite: bool) -> None:
    """Reject an OUT that would lose data: a non-bundle directory, a file, or the checkpoint itself."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory; choose another path")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty; "
                              "choose another path or pass --overwrite to replace a bundle there")
    if not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"--overwrite only replaces an edgemoe bundle, and {out} has no {MANIFEST_NAME}; "
                              "choose another output path")
    resolved_source, resolved_out = source.resolve(), out.resolve()
    if resolved_out == resolved_source or resolved_out in resolved_source.parents:
        raise FileExistsError(f"output directory {out} contains the checkpoint {source}; choose another path")


def _write_bundle(arch, checkpoint: Checkpoint, bundle: Path, dtype: str, expert_format: ExpertFormat,
                  progress: bool, block_size: int = DEFAULT_BLOCK_SIZE, auto: AutoRequest | None = None,
                  dense_dtype: str | None = None) -> Manifest:
    cfg = arch.config
    dense_dtype = dense_dtype or dtype
    # Float storage of the dense graphs; with int8 it applies to what stays float.
    np_dtype = DTYPES.get(dense_dtype, DTYPES[dtype])
    (bundle / "layers").mkdir()
    (bundle / "experts").mkdir()
    # With auto, every expert is written at every candidate width; the unchosen files are removed.
    formats = ([_expert_format(dtype, bits, block_size) for bits in AUTO_CANDIDATE_BITS]
               if auto else [expert_format])
    candidates: dict[int | None, list[ExpertEntry]] = {fmt.bits or 16: [] for fmt in formats}
    total = 2 + cfg.num_hidden_layers + sum(cfg.moe_layers) * cfg.num_experts * len(formats)
    bar = tqdm(total=total, desc="export", unit="graph", disable=not progress)

    _, embed_data, offsets = arch.build_embed(np_dtype).save(bundle, "embed")
    bar.update()
    layer_paths = []
    for layer in range(cfg.num_hidden_layers):
        graph_path, _, _ = arch.build_layer(layer, np_dtype).save(bundle / "layers", f"layer_{layer:02d}")
        layer_paths.append(f"layers/{graph_path.name}")
        bar.update()
        if not cfg.moe_layers[layer]:
            continue  # a dense layer's MLP is in its layer graph
        for index in range(cfg.num_experts):
            for fmt in formats:
                suffix = f"_{fmt.dtype}" if auto else ""
                candidates[fmt.bits or 16].append(_write_expert(arch, bundle, layer, index, fmt, suffix))
                bar.update()
    experts = candidates[formats[0].bits or 16]
    head_path, _, _ = arch.build_head(np_dtype, embed_data.name, offsets["embed_tokens.weight"]).save(bundle, "head")
    bar.update()
    bar.close()

    tokenizer = {}
    for name in TOKENIZER_FILES:
        src = checkpoint.directory / name
        if src.is_file():
            shutil.copyfile(src, bundle / name)
    tokenizer = {
        "tokenizer": "tokenizer.json",
        "tokenizer_config": "tokenizer_config.json" if (bundle / "tokenizer_config.json").is_file() else None,
        "generation_config": "generation_config.json" if (bundle / "generation_config.json").is_file() else None,
    }

    files = _file_entries(bundle)
    manifest = Manifest(
        format_version=FORMAT_VERSION, architecture=arch.model_type, dtype=dtype,
        config=cfg.runtime_config(),
        graphs={"embed": "embed.onnx", "layers": layer_paths, "head": head_path.name},
        experts=experts, files=files, tokenizer=tokenizer, dense_dtype=dense_dtype,
        source={"checkpoint": str(checkpoint.directory.resolve()),
                "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}})
    (bundle / MANIFEST_NAME).write_text(manifest.to_json())
    if auto:
        # Imported here: it runs the model, and onnxruntime must not be needed just to export
        # (the Docker build exports under QEMU, where importing onnxruntime crashes).
        from edgemoe.export.auto_bits import choose_expert_bits

        # The manifest lists both widths' files, so the calibration engine can load either.
        choice = choose_expert_bits(bundle, candidates, auto.text, auto.quality_budget,
                                    str(auto.calibration), progress=progress)
        chosen = {name for e in choice.entries for name in (e.file, e.data_file, e.widened_file) if name}
        for entry in (e for entries in candidates.values() for e in entries):
            for name in (entry.file, entry.data_file, entry.widened_file):
                if name and name not in chosen:
                    (bundle / name).unlink(missing_ok=True)
        manifest.experts = choice.entries
        manifest.files = _file_entries(bundle)
        manifest.quantization = choice.record
        manifest.__post_init__()
        (bundle / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _file_entries(bundle: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file of the bundle except the manifest."""
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(bundle).as_posix()] = FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
    return files


def _write_expert(arch, bundle: Path, layer: int, index: int, fmt: ExpertFormat, suffix: str = "") -> ExpertEntry:
    stem = f"l{layer:02d}_e{index:03d}{suffix}"
    np_dtype = DTYPES.get(fmt.dtype, DTYPES["fp32"])
    graph = arch.build_expert(layer, index, np_dtype, bits=fmt.bits, block_size=fmt.block_size)
    graph_path, data_path, _ = graph.save(bundle / "experts", stem)
    graph_bytes, data_bytes = graph_path.stat().st_size, data_path.stat().st_size
    # An fp16 expert's session keeps a float32 copy of the weights (onnxruntime folds the Cast at
    # creation), and an fp32 expert's weights stay mapped from the file. An integer expert's
    # session keeps a prepacked copy (PREPACKED_FACTOR).
    if fmt.bits is not None:
        held = math.ceil(PREPACKED_FACTOR[fmt.bits] * data_bytes)
    else:
        held = (2 if fmt.dtype == "fp16" else 1) * data_bytes
    entry = ExpertEntry(layer=layer, index=index, file=f"experts/{graph_path.name}",
                        data_file=f"experts/{data_path.name}", dtype=fmt.dtype, bytes=graph_bytes + data_bytes,
                        resident_bytes=SESSION_OVERHEAD_BYTES + graph_bytes + held,
                        bits=fmt.bits, block_size=fmt.block_size)
    if fmt.bits == 2:
        widened_path, _, _ = widened_copy(graph).save(bundle / "experts", f"{stem}_w4", data_stem=stem)
        widened_graph_bytes = widened_path.stat().st_size
        entry.widened_file = f"experts/{widened_path.name}"
        entry.widened_resident_bytes = (SESSION_OVERHEAD_BYTES + widened_graph_bytes
                                        + math.ceil(WIDENED_2BIT_FACTOR * data_bytes))
    return entry
