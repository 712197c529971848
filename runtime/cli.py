"""`edgemoe generate` and `edgemoe eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from edgemoe.runtime.budget import format_bytes, parse_size
from edgemoe.runtime.generation import GenerationResult
from edgemoe.runtime.sampling import SamplingParams


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", default=None,
                        help="bundle directory from `edgemoe export` (default: the built-in demo model)")
    parser.add_argument("--expert-budget", default=None, metavar="SIZE",
                        help="maximum bytes of resident experts: a size (300MB, 1.5GiB) or a percentage "
                             "of the bundle's expert bytes (25%%); default auto: all experts, capped at "
                             "half the available memory")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per dense onnxruntime session; 0 picks min(4, cores) (default 0)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of bundle files on first use")
    parser.add_argument("--eviction", choices=["lru", "lfu", "edgemoe"], default="lru",
                        help="which expert to evict when the budget is full: least recently used, least "
                             "frequently used, or EdgeMoE's score of frequency and distance to the "
                             "expert's layer (default lru)")
    parser.add_argument("--predictor", choices=["auto", "frequency", "table", "lookahead", "combined", "none"],
                        default="auto",
                        help="how to predict the next layer's experts for preloading (default auto: "
                             "combined when the bundle has look-ahead routers, else table)")
    parser.add_argument("--no-preload", action="store_true",
                        help="load experts only when the router picks them (no I/O thread)")
    parser.add_argument("--preload-depth", type=int, default=1,
                        help="layers ahead to preload, at least 1 (default 1)")


def add_parsers(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt",
                                description="Generate text, streaming it to stdout; statistics go to stderr.")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=128, help="maximum generated tokens (default 128)")
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="sampling temperature in [0, 100]; 0 is greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40,
                     help="sample from the K most likely tokens; 0 disables (default 40)")
    gen.add_argument("--top-p", type=float, default=0.95,
                     help="nucleus sampling mass in (0, 1]; 1 disables (default 0.95)")
    gen.add_argument("--seed", type=int, default=None,
                     help="random seed in [0, 2^63); the same seed gives the same text (default: random)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token ids, finish reason, stats) instead of the "
                          "text and the statistics line")
    gen.set_defaults(run=run_generate)

    ev = subparsers.add_parser("eval", help="perplexity of a text file",
                               description="Mean negative log-likelihood per token and perplexity of a text file.")
    add_model_arguments(ev)
    ev.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    ev.add_argument("--window", type=int, default=None,
                    help="tokens per independently scored window (default: 256, or the context window "
                         "when it is shorter)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a summary line")
    ev.set_defaults(run=run_eval)

    add_profile_parser(subparsers)
    add_bench_parser(subparsers)


def engine_options(args) -> dict:
    """EngineOptions fields from the model arguments."""
    if args.preload_depth < 1:
        raise ValueError(f"--preload-depth must be >= 1, got {args.preload_depth}")
    predictor = None if args.predictor == "none" else args.predictor
    return {"eviction": args.eviction, "predictor": predictor,
            "preload": not args.no_preload and predictor is not None, "preload_depth": args.preload_depth}


def add_profile_parser(subparsers) -> None:
    prof = subparsers.add_parser(
        "profile", help="record the routing profile that predicts experts",
        description="Run the model over a text file and store in the bundle how often each expert is "
                    "chosen and how often it follows each expert of the previous layer. Predictors "
                    "and the edgemoe eviction policy use it.")
    prof.add_argument("bundle", nargs="?", default=None,
                      help="bundle directory (default: the built-in demo model)")
    prof.add_argument("--text", required=True, metavar="FILE", help="UTF-8 calibration text")
    prof.add_argument("--window", type=int, default=None,
                      help="tokens per window (default: 256, or the context window when shorter)")
    prof.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    prof.set_defaults(run=run_profile)


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="compare decode speed and expert-cache behaviour across modes and budgets",
        description="Measure decode tokens/s, time to first token, expert hit rate, predictor recall, "
                    "stall time and bytes read per token, and peak RSS for each mode and expert budget, "
                    "each run in a fresh process. Modes: all-in-ram, on-demand, lru, edgemoe, "
                    "edgemoe:PREDICTOR:POLICY, llama.cpp (needs --gguf and llama-cpp-python).")
    bench.add_argument("bundles", nargs="*", metavar="bundle",
                       help="bundle directories, measured side by side, such as exports of one checkpoint at "
                            "different --expert-bits (default: the demo model)")
    bench.add_argument("--budgets", default="100%,50%,25%,12%",
                       help="comma-separated expert budgets (default 100%%,50%%,25%%,12%%)")
    bench.add_argument("--modes", default="all-in-ram,on-demand,lru,edgemoe",
                       help="comma-separated modes (default all-in-ram,on-demand,lru,edgemoe)")
    bench.add_argument("--prompts", metavar="FILE", default=None,
                       help="UTF-8 file with one prompt per line (default: three built-in story openings)")
    bench.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    bench.add_argument("--repeat", type=int, default=3, help="runs per mode and budget; medians reported (default 3)")
    bench.add_argument("--drop-caches", action="store_true",
                       help="drop the page cache before each run (needs root) so expert reads hit storage")
    bench.add_argument("--memory-cap", metavar="SIZE", default=None,
                       help="run each measured process in a memory cgroup with this limit, page cache "
                            "included (needs root and cgroups)")
    bench.add_argument("--gguf", metavar="FILE", default=None, help="GGUF file of the same model for llama.cpp")
    bench.add_argument("--threads", type=int, default=0, help="threads per dense session (default: min(4, cores))")
    bench.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    bench.add_argument("--plot", metavar="OUT.png", default=None,
                       help="also plot tokens/s and hit rate against the budget (needs matplotlib)")
    bench.set_defaults(run=run_bench_command)


def run_bench_command(args) -> int:
    from edgemoe.runtime.bench import DEFAULT_PROMPTS, BenchConfig, format_table, plot, run_bench
    from edgemoe.runtime.bench_run import mode_options
    import onnxruntime

    from edgemoe.runtime.kernels import runtime_manifest
    from edgemoe.runtime.loading import resolve_bundle

    bundles = [str(resolve_bundle(b)) for b in (args.bundles or [None])]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise ValueError("--budgets is empty; give sizes or percentages such as 100%,25%")
    notes, skipped = [], []
    for bundle in bundles:
        manifest = runtime_manifest(bundle)
        widened = sum(e.file == e.widened_file for e in manifest.experts)
        if widened:
            notes.append(f"{widened} 2-bit experts of {bundle} are widened to 4 bits when loaded: onnxruntime "
                         f"{onnxruntime.__version__} has no 2-bit kernel, so they load slower and take more memory")
        for budget in budgets:
            size = parse_size(budget, total=manifest.expert_bytes)
            if size < manifest.min_expert_budget:
                skipped.append((bundle, budget))
                where = f" for {bundle}" if len(bundles) > 1 else ""
                notes.append(f"budget {budget} skipped{where}: {size} bytes is below this model's minimum of "
                             f"{manifest.min_expert_budget} bytes (one layer's top-k experts)")
    budgets = [b for b in budgets if any((bundle, b) not in skipped for bundle in bundles)]
    if not budgets:
        raise ValueError("every --budgets value is below the minimum expert budget: " + "; ".join(notes))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ValueError("--modes is empty; give modes such as lru,edgemoe")
    for mode in modes:
        if mode == "llama.cpp":
            if not args.gguf:
                raise ValueError("mode llama.cpp needs --gguf FILE (a GGUF conversion of the same checkpoint)")
            if not Path(args.gguf).is_file():
                raise ValueError(f"--gguf {args.gguf} not found")
        else:
            mode_options(mode)
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 (decode speed needs two tokens), got {args.max_tokens}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json {args.json}: the directory {Path(args.json).resolve().parent} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib; pip install matplotlib, or leave out --plot") from None
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = [line.strip() for line in _read_text(args.prompts, "--prompts").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts} has no non-empty line")
    config = BenchConfig(bundles=bundles, budgets=budgets, modes=modes, prompts=prompts,
                         max_tokens=args.max_tokens, repeat=args.repeat, drop_caches=args.drop_caches,
                         memory_cap=args.memory_cap, gguf=args.gguf, threads=args.threads, notes=notes,
                         skipped=skipped)
    report = run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    if all("error" in r for r in report["results"]):
        raise RuntimeError("every benchmark run failed; the table shows why")
    return 0


def _read_text(path: str, flag: str = "--text") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {(exc.strerror or str(exc)).lower()}") from None


def run_profile(args) -> int:
    from edgemoe.runtime.loading import resolve_bundle
    from edgemoe.runtime.profiling import profile_bundle

    summary = profile_bundle(resolve_bundle(args.bundle), _read_text(args.text), args.window, source=args.text,
                             progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(summary))
    else:
        recall = ", ".join(f"{name} {value['overall']:.3f}" for name, value in summary["recall"].items())
        print(f"recorded routing of {summary['tokens']} tokens into {summary['bundle']}; "
              f"online recall of the next layer's experts: {recall}")
    return 0


def _load(args):
    from edgemoe.runtime.loading import load_model
    return load_model(args.bundle, args.expert_budget, threads=args.threads, verify=not args.no_verify,
                      **engine_options(args))


def stats_line(result: GenerationResult) -> str:
    s = result.stats
    return (f"prompt {s.prompt_tokens} tok, generated {s.generated_tokens} tok ({result.finish_reason}); "
            f"prefill {s.prefill_tokens_per_second:.1f} tok/s, decode {s.decode_tokens_per_second:.1f} tok/s; "
            f"expert loads {s.expert_loads} ({s.preloads} preloaded, {s.preloads_used} of them used), "
            f"hits {s.cache_hits}, waits for preloads {s.inflight_hits}, misses {s.cache_misses}, read {format_bytes(s.bytes_read)}, "
            f"stall {s.stall_seconds:.2f} s; peak experts {format_bytes(s.peak_resident_expert_bytes)} "
            f"of {format_bytes(s.expert_budget_bytes)} budget; peak RSS {format_bytes(s.peak_rss_bytes)}")


def _validate_flags(params: SamplingParams) -> None:
    """Validate sampling values, naming the command-line flag in the error."""
    try:
        params.validate()
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None


def run_generate(args) -> int:
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    _validate_flags(params)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model = _load(args)
    prompt_ids = model.tokenizer.encode(args.prompt)
    model.generator.check_prompt(prompt_ids)
    result = None
    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    try:
        for event in model.generator.stream(prompt_ids, args.max_tokens, params):
            if event.result is not None:
                result = event.result
            elif not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except Exception:
        if not args.json:
            sys.stdout.write("\n")  # end the partial text so the error starts on its own line
            sys.stdout.flush()
        raise
    finally:
        # On every path: a process that exits while the I/O thread is inside onnxruntime aborts
        # ("terminate called without an active exception") instead of printing the error.
        model.engine.close()
    if args.json:
        print(json.dumps({**result.as_dict(), "predictor_recall": model.engine.recall()}))
    else:
        sys.stdout.write("\n")
        print(stats_line(result), file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from edgemoe.runtime.evaluate import evaluate
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {args.text} is not UTF-8 text: {exc}") from None
    model = _load(args)
    window = args.window if args.window is not None else min(256, model.engine.context_length)
    if not 2 <= window <= model.engine.context_length:
        raise ValueError(f"--window must be in [2, {model.engine.context_length}] (the context window), "
                         f"got {window}")
    try:
        with tqdm(desc="eval", unit="tok", disable=args.json or not sys.stderr.isatty()) as bar:
            result = evaluate(model.engine, model.tokenizer, text, window, progress=bar.update)
    finally:
        model.engine.close()  # stop the I/O thread on errors too, as in run_generate
    if args.json:
        print(json.dumps({**result.as_dict(), "predictor_recall": model.engine.recall()}))
    else:
        print(f"nll {result.mean_nll:.4f} nats/token, perplexity {result.perplexity:.3f} over "
              f"{result.predicted_tokens} predicted tokens in {result.windows} windows of {result.window}; "
              f"{result.tokens_per_second:.1f} tok/s")
    return 0
