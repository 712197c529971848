"""Hugging Face checkpoint -> edgemoe bundle.

The bundle is written into `OUT.partial-PID` next to OUT and renamed when complete, so a failed or
interrupted export never leaves a half-written bundle under the requested name.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe.export.architectures import architecture_for
from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.runtime.manifest import (FORMAT_VERSION, MANIFEST_NAME, ExpertEntry, FileEntry, Manifest,
                                      sha256_file)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
# Heap memory of one expert session beyond its weights: about 150 KB measured for the demo
# model's experts (H=192, I=384) with onnxruntime 1.32 on x86_64, rounded up.
SESSION_OVERHEAD_BYTES = 160 * 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


@dataclass
class ExportSummary:
    """What an export wrote."""

    bundle: str
    architecture: str
    dtype: str
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
        return (f"exported {self.architecture} ({self.dtype}) to {self.bundle}: {shape}; dense "
                f"{self.dense_bytes / mb:.1f} MB, experts {self.expert_bytes / mb:.1f} MB; {self.seconds:.1f} s")


def export_checkpoint(source: str | Path, out: str | Path, dtype: str = "fp32",
                      overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Export a Hugging Face MoE checkpoint directory to an edgemoe bundle.

    Args:
        source: checkpoint directory (config.json, safetensors weights, tokenizer.json).
        out: bundle directory to create.
        dtype: storage precision of the weights, "fp32" or "fp16".
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
    out = Path(out)
    _check_output(Path(source), out, overwrite)
    checkpoint = Checkpoint(source)
    if not (checkpoint.directory / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer.json not found in {checkpoint.directory}; edgemoe needs the "
                              "fast-tokenizer file that Hugging Face tokenizers save")
    arch = architecture_for(checkpoint)
    arch.check_tensors()

    # One partial directory per process, so two exports to the same OUT never mix their files.
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _write_bundle(arch, checkpoint, partial, dtype, progress)
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
    expert_files = {e.file for e in manifest.experts} | {e.data_file for e in manifest.experts}
    summary = ExportSummary(
        bundle=str(out), architecture=arch.model_type, dtype=dtype, layers=cfg.num_hidden_layers,
        moe_layers=sum(arch.config.moe_layers), experts_per_layer=cfg.num_experts,
        dense_bytes=manifest.dense_bytes,
        expert_bytes=sum(manifest.files[f].bytes for f in expert_files),
        seconds=time.perf_counter() - started)
    logger.info(summary.describe())
    return summary


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


def _write_bundle(arch, checkpoint: Checkpoint, bundle: Path, dtype: str, progress: bool) -> Manifest:
    cfg = arch.config
    np_dtype = DTYPES[dtype]
    (bundle / "layers").mkdir()
    (bundle / "experts").mkdir()
    total = 2 + cfg.num_hidden_layers + sum(cfg.moe_layers) * cfg.num_experts
    bar = tqdm(total=total, desc="export", unit="graph", disable=not progress)

    _, embed_data, offsets = arch.build_embed(np_dtype).save(bundle, "embed")
    bar.update()
    layer_paths = []
    experts: list[ExpertEntry] = []
    for layer in range(cfg.num_hidden_layers):
        graph_path, _, _ = arch.build_layer(layer, np_dtype).save(bundle / "layers", f"layer_{layer:02d}")
        layer_paths.append(f"layers/{graph_path.name}")
        bar.update()
        if not cfg.moe_layers[layer]:
            continue  # a dense layer's MLP is in its layer graph
        for index in range(cfg.num_experts):
            stem = f"l{layer:02d}_e{index:03d}"
            graph_path, data_path, _ = arch.build_expert(layer, index, np_dtype).save(bundle / "experts", stem)
            stored = graph_path.stat().st_size + data_path.stat().st_size
            # An fp16 expert's session holds a float32 copy of the weights (onnxruntime folds the
            # Cast at creation); an fp32 expert's weights stay mapped from the file.
            widen = 2 if dtype == "fp16" else 1
            experts.append(ExpertEntry(
                layer=layer, index=index, file=f"experts/{graph_path.name}",
                data_file=f"experts/{data_path.name}", dtype=dtype, bytes=stored,
                resident_bytes=(SESSION_OVERHEAD_BYTES + graph_path.stat().st_size
                                + widen * data_path.stat().st_size)))
            bar.update()
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

    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        files[path.relative_to(bundle).as_posix()] = FileEntry(bytes=path.stat().st_size,
                                                               sha256=sha256_file(path))
    manifest = Manifest(
        format_version=FORMAT_VERSION, architecture=arch.model_type, dtype=dtype,
        config=cfg.runtime_config(),
        graphs={"embed": "embed.onnx", "layers": layer_paths, "head": head_path.name},
        experts=experts, files=files, tokenizer=tokenizer,
        source={"checkpoint": str(checkpoint.directory.resolve()),
                "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}})
    (bundle / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
