"""`edgemoe bench` and `edgemoe synth` run end to end on tiny models; speeds are not asserted.

Invariants checked:
- `edgemoe bench` on the tiny bundle with two budgets and five modes exits 0 and prints a table
  row for every mode (all-in-ram once, the others per budget). Its JSON results have decode
  tokens/s median, min and max, hit rate and recall, and no errors.
- With two bundles, every mode and budget runs on each, and the table and JSON name the bundle.
- An unknown mode, and llama.cpp without --gguf, fail with one `edgemoe: error:` line and a
  non-zero exit status.
- `--memory-cap 1GB` either applies, with a note naming the cgroup, which is removed afterwards,
  or a note gives the reason it could not.
- `synthesize` writes a checkpoint for each model type (olmoe, qwen3_moe, mixtral) that
  exports and generates greedy tokens. An unknown shape raises ValueError listing the shapes,
  layers < 1 raises ValueError, and a non-empty output directory raises FileExistsError and
  stays unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgemoe.export import synth
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.loading import load_model
from edgemoe.runtime.sampling import SamplingParams

BENCH_BUDGETS = ["100%", "50%"]
BENCH_MODES = ["all-in-ram", "on-demand", "lru", "edgemoe", "edgemoe:table:lfu"]
BUDGET_FREE_MODES = {"all-in-ram"}  # measured once, with budget "-"
PREDICTING_MODES = {"edgemoe": "combined", "edgemoe:table:lfu": "table"}
SMALL_BENCH = ["--repeat", "1", "--max-tokens", "4"]


def assert_one_line_error(completed) -> str:
    assert completed.returncode != 0, completed.stdout
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("edgemoe: error: ")
    return lines[0]


# edgemoe bench


@pytest.fixture(scope="module")
def bench_report(tiny_bundle, run_cli, tmp_path_factory):
    """(completed process, JSON report) of one small bench run on the tiny bundle."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    completed = run_cli(["bench", tiny_bundle, "--budgets", ",".join(BENCH_BUDGETS), "--modes",
                         ",".join(BENCH_MODES), *SMALL_BENCH, "--json", out])
    assert completed.returncode == 0, completed.stderr
    return completed, json.loads(out.read_text())


def test_bench_runs_every_mode(bench_report):
    _, report = bench_report
    expected = {(mode, "-") for mode in BUDGET_FREE_MODES}
    expected |= {(mode, budget) for mode in BENCH_MODES if mode not in BUDGET_FREE_MODES for budget in BENCH_BUDGETS}

    assert {(result["mode"], result["budget"]) for result in report["results"]} == expected
    assert len(report["results"]) == len(expected)


def test_bench_results_without_errors(bench_report):
    _, report = bench_report

    for result in report["results"]:
        assert "error" not in result, result


def test_bench_table_lists_modes(bench_report):
    completed, report = bench_report
    first_cells = [line.split()[0] for line in completed.stdout.splitlines() if line.strip()]

    assert first_cells[0] == "mode"  # the header
    for result in report["results"]:
        assert result["mode"] in first_cells
    assert len([cell for cell in first_cells if cell in BENCH_MODES]) == len(report["results"])


def test_bench_json_fields(bench_report):
    _, report = bench_report

    for result in report["results"]:
        speed = result["decode_tokens_per_second"]
        assert set(speed) == {"median", "min", "max"}, result["mode"]
        assert speed["min"] <= speed["median"] <= speed["max"], result["mode"]
        assert 0.0 <= result["hit_rate"] <= 1.0, result["mode"]
        assert isinstance(result["recall"], dict), result["mode"]


def test_bench_reports_active_predictor_recall(bench_report):
    _, report = bench_report

    for result in report["results"]:
        if result["mode"] in PREDICTING_MODES:
            assert result["predictor"] == PREDICTING_MODES[result["mode"]]
            assert 0.0 <= result["recall"][result["predictor"]] <= 1.0, result["mode"]
        else:
            assert result["predictor"] is None, result["mode"]


def test_bench_all_in_ram_hits_only(bench_report):
    _, report = bench_report
    (all_in_ram,) = [result for result in report["results"] if result["mode"] == "all-in-ram"]

    assert all_in_ram["hit_rate"] == 1.0


def test_bench_unknown_mode(tiny_bundle, run_cli):
    completed = run_cli(["bench", tiny_bundle, "--modes", "lru,fastest", *SMALL_BENCH])

    line = assert_one_line_error(completed)
    assert "'fastest'" in line


def test_bench_llama_cpp_needs_gguf(tiny_bundle, run_cli):
    completed = run_cli(["bench", tiny_bundle, "--modes", "llama.cpp", *SMALL_BENCH])

    line = assert_one_line_error(completed)
    assert "--gguf" in line


def test_bench_memory_cap_noted(tiny_bundle, run_cli, tmp_path):
    out = tmp_path / "bench.json"

    completed = run_cli(["bench", tiny_bundle, "--budgets", "100%", "--modes", "lru", "--repeat", "1",
                         "--max-tokens", "2", "--memory-cap", "1GB", "--json", out])

    assert completed.returncode == 0, completed.stderr
    notes = [note for note in json.loads(out.read_text())["config"]["notes"] if note.startswith("memory cap")]
    assert len(notes) == 1, notes
    assert f"note: {notes[0]}" in completed.stdout
    applied = re.fullmatch(r"memory cap .+ applied through (\S+)", notes[0])
    if applied:
        assert not Path(applied.group(1)).exists(), "the bench left its cgroup behind"
    else:
        assert re.fullmatch(r"memory cap not applied: .+", notes[0]), notes[0]


# edgemoe synth

TINY_COMMON = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2,
               "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
TINY_SHAPES = {
    "tiny-olmoe": {**TINY_COMMON, "model_type": "olmoe", "intermediate_size": 16, "num_hidden_layers": 2,
                   "num_experts": 4, "norm_topk_prob": False},
    "tiny-qwen3-moe": {**TINY_COMMON, "model_type": "qwen3_moe", "moe_intermediate_size": 16,
                       "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 8, "num_experts": 4,
                       "norm_topk_prob": True},
    "tiny-mixtral": {**TINY_COMMON, "model_type": "mixtral", "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_local_experts": 4},
}
SYNTH_TOKENS = 4


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(synth, "SHAPES", TINY_SHAPES)
    return TINY_SHAPES


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_synth_exports_and_generates(tiny_shapes, shape, tmp_path):
    checkpoint = synth.synthesize(shape, tmp_path / "checkpoint", layers=2, progress=False)
    export_checkpoint(checkpoint, tmp_path / "bundle", progress=False)
    model = load_model(tmp_path / "bundle")

    try:
        result = model.generator.generate(model.tokenizer.encode("Once upon a time"), SYNTH_TOKENS,
                                          SamplingParams(temperature=0), ignore_eos=True)
    finally:
        model.engine.close()

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == tiny_shapes[shape]["model_type"]
    assert config["num_hidden_layers"] == 2
    assert len(result.token_ids) == SYNTH_TOKENS


def test_synth_unknown_shape(tmp_path):
    with pytest.raises(ValueError) as error:
        synth.synthesize("gpt-oss-20b", tmp_path / "checkpoint", progress=False)

    message = str(error.value)
    assert "'gpt-oss-20b'" in message
    for shape in synth.SHAPES:
        assert shape in message
    assert not (tmp_path / "checkpoint").exists()


def test_synth_rejects_zero_layers(tiny_shapes, tmp_path):
    with pytest.raises(ValueError) as error:
        synth.synthesize("tiny-mixtral", tmp_path / "checkpoint", layers=0, progress=False)

    assert "--layers" in str(error.value)


def test_synth_existing_output(tiny_shapes, tmp_path):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError) as error:
        synth.synthesize("tiny-mixtral", out, progress=False)

    assert str(out) in str(error.value)
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_bench_fails_when_every_run_fails(tiny_bundle, run_cli, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file")

    completed = run_cli(["bench", tiny_bundle, "--modes", "llama.cpp", "--gguf", not_gguf, *SMALL_BENCH])

    assert completed.returncode == 1
    assert "every benchmark run failed" in completed.stderr


def test_bench_skips_budget_below_minimum(tiny_bundle, run_cli):
    completed = run_cli(["bench", tiny_bundle, "--budgets", "100%,1%", "--modes", "lru", *SMALL_BENCH])

    assert completed.returncode == 0, completed.stderr
    assert "budget 1% skipped" in completed.stdout


def test_bench_rejects_unknown_predictor_in_mode(tiny_bundle, run_cli):
    completed = run_cli(["bench", tiny_bundle, "--modes", "edgemoe:bogus:lru", *SMALL_BENCH])

    line = assert_one_line_error(completed)
    assert "'bogus'" in line


def test_bench_compares_bundles_side_by_side(tiny_bundle, bundle_path, run_cli, tmp_path):
    other = bundle_path("tiny-olmoe")
    out = tmp_path / "two.json"
    completed = run_cli(["bench", tiny_bundle, other, "--budgets", "100%", "--modes", "lru", *SMALL_BENCH,
                         "--json", out])

    assert completed.returncode == 0, completed.stderr
    header = completed.stdout.splitlines()[0].split()
    assert header[:3] == ["bundle", "mode", "budget"]
    rows = json.loads(out.read_text())["results"]
    assert [(r["bundle"], r["mode"]) for r in rows] == [(Path(tiny_bundle).name, "lru"), (Path(other).name, "lru")]
    assert all(r["decode_tokens_per_second"]["median"] > 0 for r in rows)
