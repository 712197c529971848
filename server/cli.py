"""`edgemoe serve`."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def add_parsers(subparsers) -> None:
    from edgemoe.runtime.cli import add_model_arguments

    parser = subparsers.add_parser("serve", help="serve the model over HTTP",
                                   description="Serve POST /generate and GET /health over HTTP.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1; 0.0.0.0 serves the whole network)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from edgemoe.server.app import create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    app = create_app(args.bundle, args.expert_budget, args.threads, verify=not args.no_verify)
    logger.info("serving on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
