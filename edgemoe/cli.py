"""The `edgemoe` command. Each part registers its own subcommands; export's dependencies
(onnx) are imported only when `edgemoe export` runs."""

from __future__ import annotations

import argparse
import logging
import sys

from edgemoe import __version__

logger = logging.getLogger("edgemoe")


def build_parser() -> argparse.ArgumentParser:
    from edgemoe.export import cli as export_cli
    from edgemoe.runtime import cli as runtime_cli
    from edgemoe.server import cli as server_cli

    parser = argparse.ArgumentParser(prog="edgemoe", description=(
        "Run Mixture-of-Experts language models larger than RAM: experts stream from storage "
        "into a byte-budgeted cache."))
    parser.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="logging level (default: info for serve, warning otherwise)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cli.add_parsers(subparsers)
    runtime_cli.add_parsers(subparsers)
    server_cli.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "serve" else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # one line for the user; the traceback only at --log-level debug
        logger.debug("command failed", exc_info=True)
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename:
            message = f"{exc.filename}: {exc.strerror.lower()}"
        print(f"edgemoe: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
