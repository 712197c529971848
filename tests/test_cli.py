"""The `edgemoe` command, run in a subprocess as a user runs it.

Invariants checked:
- `generate --json` prints one JSON object with text, token_ids, finish_reason and the
  documented stats. Greedy output of the demo model equals the transformers reference, and
  the text is the decoded token ids.
- The same seed gives the same text, and `--temperature 0` gives the same text twice.
- Plain `generate` streams the prompt and the continuation to stdout and one statistics line
  to stderr.
- `eval --json` prints the scores that `evaluate` computes in-process on the same file.
- Errors exit with status 1 and exactly one stderr line starting with `edgemoe: error:`,
  without a traceback.
- Without a bundle, `generate` exports the built-in demo model into EDGEMOE_CACHE_DIR and
  uses it.
"""

from __future__ import annotations

import json

import pytest

from conftest import checkpoint_dir
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.tokenizer import BundleTokenizer

STATS_KEYS = {"prompt_tokens", "generated_tokens", "prefill_seconds", "decode_seconds",
              "prefill_tokens_per_second", "decode_tokens_per_second", "expert_loads", "cache_hits",
              "cache_misses", "bytes_read", "load_seconds", "peak_resident_expert_bytes",
              "expert_budget_bytes", "peak_rss_bytes"}
EVAL_KEYS = {"mean_nll", "perplexity", "predicted_tokens", "windows", "window", "tokens_per_second", "seconds"}
STORY = ("Once upon a time, there was a little dog named Max. Max liked to run in the park with his "
         "friend Sue. One day, Sue found a big red ball under a tree. She threw the ball and Max ran "
         "after it. They played until the sun went down, and then they went home happy.\n")


def generate_json(run_cli, *args) -> dict:
    completed = run_cli(["generate", *args, "--json"])
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def assert_one_line_error(completed) -> str:
    """Check the error contract of the CLI and return the error line."""
    assert completed.returncode == 1, completed.stdout
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("edgemoe: error: ")
    return lines[0]


def test_generate_json_fields(demo_bundle, run_cli, load_reference):
    reference = load_reference("demo")

    output = generate_json(run_cli, demo_bundle, "--prompt", reference.prompt_text, "--temperature", "0",
                           "--max-tokens", len(reference.greedy_ids))

    assert set(output) == {"text", "token_ids", "finish_reason", "stats", "predictor_recall"}
    assert STATS_KEYS <= set(output["stats"])
    assert output["token_ids"] == reference.greedy_ids
    assert output["finish_reason"] == "length"
    assert output["stats"]["prompt_tokens"] == len(reference.prompt_ids)
    assert output["stats"]["generated_tokens"] == len(reference.greedy_ids)
    assert output["stats"]["peak_resident_expert_bytes"] <= output["stats"]["expert_budget_bytes"]
    tokenizer = BundleTokenizer(demo_bundle, load_manifest(demo_bundle))
    assert output["text"] == tokenizer.decode(output["token_ids"])


def test_generate_same_seed_same_text(demo_bundle, run_cli):
    args = [demo_bundle, "--prompt", "The little cat", "--max-tokens", "24", "--temperature", "1.0", "--seed", "7"]

    first = generate_json(run_cli, *args)
    second = generate_json(run_cli, *args)

    assert first["text"] == second["text"]
    assert first["token_ids"] == second["token_ids"]


def test_generate_greedy_repeatable(tiny_bundle, run_cli):
    args = [tiny_bundle, "--prompt", "Tom had a red ball", "--max-tokens", "16", "--temperature", "0"]

    first = generate_json(run_cli, *args)
    second = generate_json(run_cli, *args)

    assert first["token_ids"] == second["token_ids"]
    assert first["text"] == second["text"]


def test_generate_plain_output(demo_bundle, run_cli):
    prompt = "Once upon a time"
    completed = run_cli(["generate", demo_bundle, "--prompt", prompt, "--max-tokens", "8", "--temperature", "0"])

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(prompt)
    assert len(completed.stdout) > len(prompt) + 1
    stderr_lines = completed.stderr.splitlines()
    assert len(stderr_lines) == 1, completed.stderr
    assert "generated 8 tok" in stderr_lines[0]


def test_eval_json_matches_evaluate(demo_bundle, run_cli, tmp_path):
    text_file = tmp_path / "story.txt"
    text_file.write_text(STORY * 4, encoding="utf-8")

    completed = run_cli(["eval", demo_bundle, "--text", text_file, "--window", "64", "--json"])

    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)
    assert EVAL_KEYS <= set(output)
    engine = Engine(demo_bundle)
    expected = evaluate(engine, BundleTokenizer(demo_bundle, engine.manifest), STORY * 4, window=64)
    assert output["mean_nll"] == pytest.approx(expected.mean_nll, rel=1e-6)
    assert output["predicted_tokens"] == expected.predicted_tokens
    assert output["windows"] == expected.windows
    assert output["window"] == 64


@pytest.fixture(scope="module")
def error_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-errors")
    (directory / "not-utf8.txt").write_bytes(b"\xff\xfe not text")
    (directory / "one-token.txt").write_text("a")
    (directory / "notes").mkdir()
    (directory / "notes" / "notes.txt").write_text("keep")
    return directory


ERROR_CASES = {
    "missing-bundle": (["generate", "{files}/no-such-bundle", "--prompt", "x"], "not found"),
    "invalid-budget": (["generate", "{demo}", "--prompt", "x", "--expert-budget", "12Q"], "'12Q'"),
    "budget-too-small": (["generate", "{demo}", "--prompt", "x", "--expert-budget", "1KB"], "at least"),
    "zero-max-tokens": (["generate", "{demo}", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    "negative-temperature": (["generate", "{demo}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    "top-p-zero": (["generate", "{demo}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    "prompt-too-long": (["generate", "{demo}", "--prompt", "dog " * 600, "--json"], "512"),
    "eval-window-one": (["eval", "{demo}", "--text", "{files}/one-token.txt", "--window", "1"], "window"),
    "eval-not-utf8": (["eval", "{demo}", "--text", "{files}/not-utf8.txt"], "not UTF-8"),
    "eval-missing-file": (["eval", "{demo}", "--text", "{files}/absent.txt"], "absent.txt"),
    "eval-one-token": (["eval", "{demo}", "--text", "{files}/one-token.txt"], "at least 2"),
    "export-existing-out": (["export", "{checkpoint}", "{files}/notes"], "--overwrite"),
    "export-missing-source": (["export", "{files}/no-checkpoint", "{files}/out"], "not found"),
    "serve-invalid-port": (["serve", "{demo}", "--port", "70000"], "--port"),
    "serve-missing-bundle": (["serve", "{files}/no-such-bundle", "--port", "0"], "not found"),
    "serve-invalid-budget": (["serve", "{demo}", "--port", "0", "--expert-budget", "12Q"], "'12Q'"),
    "serve-budget-too-small": (["serve", "{demo}", "--port", "0", "--expert-budget", "10KB"], "at least"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_one_line(case, demo_bundle, error_files, run_cli):
    args, expected_text = ERROR_CASES[case]
    values = {"demo": demo_bundle, "files": error_files, "checkpoint": checkpoint_dir("tiny-mixtral")}
    completed = run_cli([arg.format(**values) for arg in args])

    line = assert_one_line_error(completed)
    assert expected_text in line


def test_generate_default_demo(tmp_path, run_cli, load_reference):
    reference = load_reference("demo")
    cache = tmp_path / "cache"

    completed = run_cli(["generate", "--prompt", reference.prompt_text, "--temperature", "0", "--max-tokens", "8",
                         "--json"], env={"EDGEMOE_CACHE_DIR": str(cache)})

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["token_ids"] == reference.greedy_ids[:8]
    bundles = [path.name for path in cache.iterdir()]
    assert len(bundles) == 1
    assert bundles[0].startswith("demo-tinystories-moe-8x-")
    assert (cache / bundles[0] / "manifest.json").is_file()


def test_prompt_too_long_prints_nothing(demo_bundle, run_cli):
    completed = run_cli(["generate", str(demo_bundle), "--prompt", "dog " * 600])

    assert completed.returncode != 0
    assert completed.stdout == ""
