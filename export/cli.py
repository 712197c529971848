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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")
    parser.set_defaults(run=run_export)


def run_export(args) -> int:
    import sys

    from edgemoe.export.writer import export_checkpoint

    summary = export_checkpoint(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                progress=sys.stderr.isatty())
    print(summary.describe())
    return 0
