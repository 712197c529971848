"""`edgemoe generate` and `edgemoe eval`."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from edgemoe.runtime.budget import format_bytes
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


def _load(args):
    from edgemoe.runtime.loading import load_model
    return load_model(args.bundle, args.expert_budget, threads=args.threads, verify=not args.no_verify)


def stats_line(result: GenerationResult) -> str:
    s = result.stats
    return (f"prompt {s.prompt_tokens} tok, generated {s.generated_tokens} tok ({result.finish_reason}); "
            f"prefill {s.prefill_tokens_per_second:.1f} tok/s, decode {s.decode_tokens_per_second:.1f} tok/s; "
            f"expert loads {s.expert_loads}, hits {s.cache_hits}, misses {s.cache_misses}, "
            f"read {format_bytes(s.bytes_read)}; peak experts {format_bytes(s.peak_resident_expert_bytes)} "
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
    if args.json:
        print(json.dumps(result.as_dict()))
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
    with tqdm(desc="eval", unit="tok", disable=args.json or not sys.stderr.isatty()) as bar:
        result = evaluate(model.engine, model.tokenizer, text, window, progress=bar.update)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"nll {result.mean_nll:.4f} nats/token, perplexity {result.perplexity:.3f} over "
              f"{result.predicted_tokens} predicted tokens in {result.windows} windows of {result.window}; "
              f"{result.tokens_per_second:.1f} tok/s")
    return 0
