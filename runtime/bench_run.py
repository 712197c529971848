"""One benchmark measurement in its own process: `python -m edgemoe.runtime.bench_run CONFIG_JSON`.

`edgemoe bench` starts one such process per mode, budget and repeat, so that each run starts
with a fresh process (RSS, page cache after a drop) and can be put in a memory cgroup. It prints
one JSON object on its last line of stdout.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

# mode -> EngineOptions fields; the budget comes from the run's config
MODES = {
    "all-in-ram": {"predictor": None, "preload": False},
    "on-demand": {"predictor": None, "preload": False, "keep_only_current_layer": True},
    "lru": {"predictor": None, "preload": False, "eviction": "lru"},
    "edgemoe": {"predictor": "auto", "preload": True, "eviction": "edgemoe"},
}


def mode_options(mode: str) -> dict:
    """EngineOptions for a mode name; `edgemoe:PREDICTOR:POLICY` picks a predictor and policy.

    Raises:
        ValueError: unknown mode.
    """
    if mode in MODES:
        return dict(MODES[mode])
    parts = mode.split(":")
    if len(parts) == 3 and parts[0] == "edgemoe":
        from edgemoe.runtime.eviction import POLICIES
        from edgemoe.runtime.predictors import PREDICTORS

        predictor, policy = parts[1], parts[2]
        if predictor not in ("auto", *PREDICTORS):
            raise ValueError(f"unknown predictor {predictor!r} in mode {mode!r}; choose one of auto, "
                             f"{', '.join(PREDICTORS)} (for no predictor, use the lru mode)")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r} in mode {mode!r}; choose one of "
                             f"{', '.join(POLICIES)}")
        return {"predictor": predictor, "preload": True, "eviction": policy}
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}, llama.cpp, or "
                     "edgemoe:PREDICTOR:POLICY (e.g. edgemoe:table:lru)")


def run_edgemoe(config: dict) -> dict:
    from edgemoe.runtime.loading import load_model
    from edgemoe.runtime.sampling import SamplingParams

    mode = config["mode"]
    budget = "100%" if mode == "all-in-ram" else config["budget"]
    started = time.perf_counter()
    model = load_model(config["bundle"], budget, threads=config.get("threads", 0), verify=False,
                       **mode_options(mode))
    if mode == "all-in-ram":
        model.engine.load_all_experts()
    load_seconds = time.perf_counter() - started

    store = model.engine.store
    before = store.stats.as_dict()
    rates, first_token, tokens = [], [], 0
    try:
        for prompt in config["prompts"]:
            ids = model.tokenizer.encode(prompt)
            result = model.generator.generate(ids, config["max_tokens"], SamplingParams(temperature=0),
                                              ignore_eos=True)
            s = result.stats
            rates.append(s.decode_tokens_per_second)
            first_token.append(s.prefill_seconds)  # the first token is sampled from the prefill logits
            tokens += s.generated_tokens
    finally:
        # Stop the I/O thread on errors too: exiting while it is inside onnxruntime aborts the
        # process, and the driver would then report the abort instead of this run's error.
        model.engine.close()
    after = store.stats.as_dict()
    delta = {k: after[k] - before[k] for k in after if k != "peak_resident_bytes"}
    requests = delta["hits"] + delta["misses"] + delta["inflight_hits"]
    from edgemoe.runtime.stats import peak_rss_bytes

    recall = model.engine.recall()
    active = model.engine.predictor.name if model.engine.predictor is not None else None
    return {
        "decode_tokens_per_second": statistics.median(rates),
        "time_to_first_token": statistics.median(first_token),
        "hit_rate": delta["hits"] / requests if requests else None,
        "stall_seconds_per_token": delta["stall_seconds"] / max(tokens, 1),
        "bytes_read_per_token": delta["bytes_read"] / max(tokens, 1),
        "expert_loads": delta["loads"], "preloads": delta["preloads"], "preloads_used": delta["preloads_used"],
        "peak_rss_bytes": peak_rss_bytes(), "peak_resident_expert_bytes": after["peak_resident_bytes"],
        "budget_bytes": store.budget_bytes, "load_seconds": load_seconds,
        "recall": {name: value["overall"] for name, value in recall.items()},
        "predictor": active, "tokens": tokens,
    }


def run_llama_cpp(config: dict) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return {"error": f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python"}
    from edgemoe.runtime.stats import peak_rss_bytes

    started = time.perf_counter()
    llm = Llama(model_path=config["gguf"], n_ctx=1024, n_threads=config.get("threads") or 2, use_mmap=True,
                verbose=False)
    load_seconds = time.perf_counter() - started
    rates, first_token, tokens = [], [], 0
    for prompt in config["prompts"]:
        llm.reset()
        ids = llm.tokenize(prompt.encode())
        begin = time.perf_counter()
        first = None
        count = 0
        for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count >= config["max_tokens"]:
                break
        end = time.perf_counter()
        first_token.append(first - begin)
        rates.append((count - 1) / (end - first) if count > 1 else 0.0)
        tokens += count
    return {"decode_tokens_per_second": statistics.median(rates),
            "time_to_first_token": statistics.median(first_token), "hit_rate": None,
            "stall_seconds_per_token": None, "bytes_read_per_token": None, "peak_rss_bytes": peak_rss_bytes(),
            "load_seconds": load_seconds, "recall": {}, "tokens": tokens}


def main() -> int:
    config = json.loads(sys.argv[1])
    try:
        result = run_llama_cpp(config) if config["mode"] == "llama.cpp" else run_edgemoe(config)
    except Exception as exc:  # reported to the driver, which prints it in the table
        result = {"error": str(exc) or type(exc).__name__}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
