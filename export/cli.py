"""`edgemoe export`. Only argparse is imported here; onnx is imported when the command runs."""

from __future__ import annotations


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="convert a Hugging Face MoE checkpoint to an edgemoe bundle",
        description="Convert a Hugging Face MoE checkpoint directory (config.json, safetensors, "
                    "tokenizer.json) into a bundle with one ONNX graph per expert.")
    parser.add_argument("source", help="Hugging Face checkpoint directory")
    parser.add_argument("out", help="bundle directory to create")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                        help="storage precision of the weights (default fp32)")
    parser.add_argument("--dense-dtype", choices=["fp32", "fp16", "int8"], default=None,
                        help="precision of the resident weights (attention, shared experts, dense layers' "
                             "MLPs, LM head): int8 stores their linear weights as 8-bit integers with one "
                             "float32 scale per block, while routers, norms and the embedding table stay float "
                             "(default: the --dtype precision)")
    parser.add_argument("--expert-bits", choices=["16", "8", "4", "2", "auto"], default=None,
                        help="precision of the routed experts: 16 stores fp16, 8, 4 and 2 store integers with "
                             "one float32 scale per block (2 also with a zero point), auto picks a width per "
                             "expert on the calibration text (default: the --dtype precision)")
    parser.add_argument("--quality-budget", type=_percentage, default=None, metavar="PERCENT",
                        help="with --expert-bits auto: allowed calibration perplexity increase over "
                             "all-fp16 experts, such as 2%% (default 2%%)")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="with --expert-bits auto: UTF-8 text to measure perplexity on, in the style of "
                             "the model's use (default: built-in stories sampled from the demo model)")
    parser.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256], default=32,
                        help="weights per quantization scale, along each projection's input axis, "
                             "for --expert-bits 8, 4 and 2 and --dense-dtype int8 (default 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")
    parser.add_argument("--profile-text", metavar="FILE", default=None,
                        help="after exporting, record the routing profile on this UTF-8 calibration text "
                             "(same as `edgemoe profile OUT --text FILE`)")
    parser.set_defaults(run=run_export)

    synth = subparsers.add_parser(
        "synth", help="write a random-weight checkpoint with the layer sizes of a real MoE model",
        description="Write a Hugging Face checkpoint with random float16 weights and the layer sizes "
                    "of a real model, for speed benchmarks (routing on random weights is not realistic).")
    synth.add_argument("out", help="checkpoint directory to create")
    synth.add_argument("--shape", required=True, choices=["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"],
                       help="real model whose layer sizes to copy")
    synth.add_argument("--layers", type=int, default=2, help="decoder layers to write (default 2)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(run=run_synth)


def _percentage(value: str) -> float:
    """Parse "2%" or "2" (percent) into a fraction."""
    import argparse

    try:
        number = float(value.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {value!r}; write a number such as 2%") from None
    return number / 100


def run_synth(args) -> int:
    import sys

    from edgemoe.export.synth import synthesize

    out = synthesize(args.shape, args.out, layers=args.layers, seed=args.seed, progress=sys.stderr.isatty())
    layers = "1 layer" if args.layers == 1 else f"{args.layers} layers"
    print(f"wrote a random {args.shape} checkpoint with {layers} to {out}")
    return 0


def run_export(args) -> int:
    import sys

    from edgemoe.export.writer import DEFAULT_QUALITY_BUDGET, export_checkpoint

    if args.profile_text:
        from edgemoe.runtime.cli import _read_text
        _read_text(args.profile_text, "--profile-text")  # fail before a long export, not after it

    if args.expert_bits != "auto":
        unused = [flag for flag, value in (("--quality-budget", args.quality_budget),
                                           ("--calibration", args.calibration)) if value is not None]
        if unused:
            raise ValueError(f"{' and '.join(unused)} apply only with --expert-bits auto; add --expert-bits auto "
                             f"or leave out {' and '.join(unused)}")
    bits = None if args.expert_bits is None else args.expert_bits if args.expert_bits == "auto" \
        else int(args.expert_bits)
    quality_budget = DEFAULT_QUALITY_BUDGET if args.quality_budget is None else args.quality_budget
    summary = export_checkpoint(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                progress=sys.stderr.isatty(), expert_bits=bits, block_size=args.block_size,
                                quality_budget=quality_budget, calibration=args.calibration,
                                dense_dtype=args.dense_dtype)
    print(summary.describe())
    if args.expert_bits == "auto":
        from edgemoe.runtime.manifest import load_manifest

        record = load_manifest(args.out).quantization
        ppl = record["perplexity"]
        uniform = ", ".join(f"{name} {value:.3f}" for name, value in ppl.items() if name != "mix")
        low, high = (f"int{b}" if b != 16 else "fp16" for b in (record["low_bits"], record["high_bits"]))
        if low == high:
            chosen = f"all {len(load_manifest(args.out).experts)} experts at {low}"
        else:
            chosen = f"{record['experts_at_low_bits']} experts at {low}, the others at {high}"
        print(f"{chosen}; calibration perplexity {uniform}, chosen mix {ppl['mix']:.3f} "
              f"(limit {record['perplexity_limit']:.3f})")
    if args.profile_text:
        from edgemoe.runtime.cli import _read_text
        from edgemoe.runtime.profiling import profile_bundle

        result = profile_bundle(args.out, _read_text(args.profile_text, "--profile-text"), source=args.profile_text,
                                progress=sys.stderr.isatty())
        print(f"recorded the routing profile of {result['tokens']} tokens")
    return 0
