"""Bad checkpoints, bundles, prompts and budgets fail early with errors that name the problem.

Invariants checked:
- Export errors list the supported model types for an unknown model_type, and name a missing
  tensor of a single-file or sharded checkpoint.
- Export rejects a non-empty OUT without overwrite and leaves it untouched. A failed export
  leaves neither OUT nor an OUT.partial-PID directory, and a failed overwrite keeps the old bundle.
- A truncated bundle file fails at load with a BundleError naming the file and both sizes.
- A same-size alteration of an expert's weights raises a sha256 BundleError naming the file
  when that expert is first acquired, before it runs. The CLI reports it in one line.
- Altered dense weights and tokenizer files fail at load.
- A prompt longer than the demo model's 512-token context window raises ContextLengthError
  naming both numbers. A prompt that leaves 2 free positions generates 2 tokens.
- Unparsable or out-of-range budgets raise BudgetError.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import checkpoint_dir, flip_byte
from edgemoe.export.architectures import UnsupportedConfigError
from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.budget import BudgetError, parse_size
from edgemoe.runtime.engine import ContextLengthError, Engine
from edgemoe.runtime.generation import Generator
from edgemoe.runtime.loading import load_model, resolve_budget
from edgemoe.runtime.manifest import BundleError, load_manifest
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.runtime.tokenizer import BundleTokenizer

MISSING_EXPERT_TENSOR = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A writable copy of the tiny-mixtral fp32 bundle."""
    destination = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, destination)
    return destination


# Export


def test_unknown_model_type_lists_supported(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy("tiny-mixtral")
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llama4_moe"
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError) as error:
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)

    message = str(error.value)
    assert "llama4_moe" in message
    for supported in ("mixtral", "olmoe", "qwen3_moe"):
        assert supported in message
    assert not (tmp_path / "out").exists()


def test_missing_tensor_named(checkpoint_copy, write_safetensors, tmp_path):
    checkpoint = checkpoint_copy("tiny-mixtral")
    source = Checkpoint(checkpoint)
    tensors = {name: source.get(name) for name in source.names() if name != MISSING_EXPERT_TENSOR}
    write_safetensors(checkpoint / "model.safetensors", tensors)

    with pytest.raises(CheckpointError) as error:
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)

    assert MISSING_EXPERT_TENSOR in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.partial*"))


def test_missing_tensor_sharded_named(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy("tiny-qwen3-moe")
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    missing = "model.layers.2.mlp.experts.4.down_proj.weight"
    del index["weight_map"][missing]
    index_path.write_text(json.dumps(index))

    with pytest.raises(CheckpointError) as error:
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)

    assert missing in str(error.value)


def test_existing_output_rejected(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError) as error:
        export_checkpoint(checkpoint_dir("tiny-mixtral"), out, progress=False)

    assert str(out) in str(error.value)
    assert "--overwrite" in str(error.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def write_unreadable_expert(checkpoint, write_safetensors) -> str:
    """Rewrite the checkpoint with one expert tensor stored as F8_E4M3, which edgemoe cannot read.

    The tensor is present, so the export passes its up-front tensor check and fails while
    writing the bundle.
    """
    source = Checkpoint(checkpoint)
    tensors = {name: source.get(name) for name in source.names()}
    write_safetensors(checkpoint / "model.safetensors", tensors, dtypes={MISSING_EXPERT_TENSOR: "F8_E4M3"})
    return MISSING_EXPERT_TENSOR


def test_failed_export_leaves_nothing(checkpoint_copy, write_safetensors, tmp_path):
    checkpoint = checkpoint_copy("tiny-mixtral")
    bad_tensor = write_unreadable_expert(checkpoint, write_safetensors)
    out = tmp_path / "out"

    with pytest.raises(CheckpointError) as error:
        export_checkpoint(checkpoint, out, progress=False)

    assert bad_tensor in str(error.value)
    assert not out.exists()
    assert not list(tmp_path.glob("out.partial*"))


def test_failed_overwrite_keeps_bundle(checkpoint_copy, write_safetensors, bundle_copy):
    manifest_before = (bundle_copy / "manifest.json").read_text()
    checkpoint = checkpoint_copy("tiny-mixtral")
    write_unreadable_expert(checkpoint, write_safetensors)

    with pytest.raises(CheckpointError):
        export_checkpoint(checkpoint, bundle_copy, overwrite=True, progress=False)

    assert (bundle_copy / "manifest.json").read_text() == manifest_before
    assert not list(bundle_copy.parent.glob(bundle_copy.name + ".partial*"))
    load_manifest(bundle_copy)


# Bundle files


def test_truncated_file_rejected_at_load(bundle_copy):
    path = bundle_copy / "experts" / "l01_e003.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)

    with pytest.raises(BundleError) as error:
        load_manifest(bundle_copy)

    message = str(error.value)
    assert "experts/l01_e003.bin" in message
    assert str(size - 100) in message
    assert str(size) in message


def test_altered_expert_fails_first_acquire(bundle_copy):
    flip_byte(bundle_copy / "experts" / "l01_e003.bin", 100)
    engine = Engine(bundle_copy)  # dense files are intact, so loading succeeds
    store = engine.store

    with pytest.raises(BundleError) as error:
        store.acquire(1, 3)

    message = str(error.value)
    assert "experts/l01_e003.bin" in message
    assert "sha256" in message
    assert (1, 3) not in store.resident_keys()
    assert store.stats.loads == 0
    store.acquire(1, 2)  # intact experts still load
    assert store.stats.loads == 1


def test_altered_expert_cli_one_line(demo_bundle, tmp_path, run_cli):
    bundle = tmp_path / "demo"
    shutil.copytree(demo_bundle, bundle)
    engine = Engine(bundle)
    acquired = []
    acquire = engine.store.acquire

    def recording_acquire(layer: int, index: int):
        acquired.append((layer, index))
        return acquire(layer, index)

    # Alter the first expert that the prompt's prefill acquires, so the CLI reads it first.
    engine.store.acquire = recording_acquire
    tokenizer = BundleTokenizer(bundle, engine.manifest)
    engine.forward(np.asarray(tokenizer.encode(PROMPT)), engine.new_cache())
    layer, index = acquired[0]
    altered_file = engine.manifest.expert(layer, index).data_file
    flip_byte(bundle / altered_file, 4096)

    completed = run_cli(["generate", bundle, "--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0"])

    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("edgemoe: error: ")
    assert altered_file in lines[0]
    assert "sha256" in lines[0]


def test_altered_layer_rejected_at_load(bundle_copy):
    flip_byte(bundle_copy / "layers" / "layer_01.bin", 8)

    with pytest.raises(BundleError) as error:
        Engine(bundle_copy)

    assert "layers/layer_01.bin" in str(error.value)


def test_altered_tokenizer_rejected_at_load(bundle_copy):
    path = bundle_copy / "tokenizer.json"
    size = path.stat().st_size
    path.write_text(path.read_text().replace("<|endoftext|>", "<|endoftexT|>", 1))
    assert path.stat().st_size == size, "test setup: the alteration must keep the size"

    with pytest.raises(BundleError) as error:
        load_model(bundle_copy)

    assert "tokenizer.json" in str(error.value)
    assert "sha256" in str(error.value)


# Prompts


def test_prompt_longer_than_context(demo_bundle):
    engine = Engine(demo_bundle)
    generator = Generator(engine, BundleTokenizer(demo_bundle, engine.manifest))
    prompt_ids = generator.tokenizer.encode("dog " * 600)
    assert len(prompt_ids) > 512

    with pytest.raises(ContextLengthError) as error:
        generator.generate(prompt_ids, 8, SamplingParams(temperature=0.0))

    assert str(len(prompt_ids)) in str(error.value)
    assert "512" in str(error.value)


def test_forward_past_context(demo_bundle):
    engine = Engine(demo_bundle)

    with pytest.raises(ContextLengthError) as error:
        engine.forward(np.ones(513, dtype=np.int64), engine.new_cache())

    assert "513" in str(error.value)
    assert "512" in str(error.value)


def test_prompt_filling_context_stops(demo_bundle):
    engine = Engine(demo_bundle)
    generator = Generator(engine, BundleTokenizer(demo_bundle, engine.manifest))
    prompt_ids = generator.tokenizer.encode("dog " * 600)[:510]

    result = generator.generate(prompt_ids, 8, SamplingParams(temperature=0.0))

    # Greedy from this prompt never picks EOS, so only the 2 free positions limit the output.
    assert len(result.token_ids) == 2
    assert result.finish_reason == "length"


# Budgets


@pytest.mark.parametrize("text", ["12Q", "-5MB", "0%", "150%", "abc", "0MB", pytest.param("", id="empty")])
def test_invalid_budget_rejected(text):
    with pytest.raises(BudgetError) as error:
        parse_size(text, total=1000)

    assert repr(text) in str(error.value)


@pytest.mark.parametrize("text, expected", [("300MB", 300 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
                                            ("25%", 250), ("100%", 1000), ("4096", 4096)])
def test_valid_budget_parsed(text, expected):
    assert parse_size(text, total=1000) == expected


def test_budget_error_names_option(tiny_bundle):
    with pytest.raises(BudgetError) as error:
        resolve_budget("12Q", load_manifest(tiny_bundle))

    assert "--expert-budget" in str(error.value)


def test_overwrite_keeps_non_bundle_directory(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "important.txt").write_text("keep")

    with pytest.raises(FileExistsError) as error:
        export_checkpoint(checkpoint_dir("tiny-mixtral"), out, overwrite=True, progress=False)

    assert "manifest.json" in str(error.value)
    assert (out / "important.txt").read_text() == "keep"


def test_overwrite_rejects_checkpoint_parent(tmp_path, checkpoint_copy, tiny_bundle):
    checkpoint = checkpoint_copy("tiny-mixtral")
    shutil.copy(tiny_bundle / "manifest.json", checkpoint.parent / "manifest.json")

    with pytest.raises(FileExistsError) as error:
        export_checkpoint(checkpoint, checkpoint.parent, overwrite=True, progress=False)

    assert "contains the checkpoint" in str(error.value)
    assert (checkpoint / "config.json").is_file()
