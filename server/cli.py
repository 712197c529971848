"""`edgemoe serve`. Every flag has an EDGEMOE_* environment twin (flags win)."""

from __future__ import annotations

import argparse
import logging
import os
import socket

logger = logging.getLogger(__name__)

# flag -> (settings field, type, help)
_FLAGS = {
    "--host": ("host", str, "bind address (default 127.0.0.1; 0.0.0.0 serves the whole network)"),
    "--port": ("port", int, "TCP port (default 8000)"),
    "--model-id": ("model_id", str, "model id reported by /v1/models (default: the bundle's name)"),
    "--api-key": ("api_key", str, "require 'Authorization: Bearer KEY' on every route but /health"),
    "--queue-size": ("queue_size", int, "requests that may wait behind the running one (default 8)"),
    "--request-timeout": ("request_timeout", float, "seconds one request may generate (default 300)"),
    "--max-body-bytes": ("max_body_bytes", int, "largest request body in bytes (default 1000000)"),
    "--max-prompt-tokens": ("max_prompt_tokens", int, "longest prompt in tokens (default: context window)"),
    "--cors-origin": ("cors_origins", str, "allow this origin through CORS; repeat for more (default: CORS off)"),
}


def add_parsers(subparsers) -> None:
    from edgemoe.runtime.cli import add_model_arguments

    parser = subparsers.add_parser(
        "serve", help="serve the model over HTTP (OpenAI-compatible and /generate)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /generate, /health and "
                    "/metrics. Every flag also reads an EDGEMOE_* environment variable "
                    "(e.g. EDGEMOE_API_KEY); flags win.")
    add_model_arguments(parser)
    for flag, (field, kind, help_text) in _FLAGS.items():
        action = "append" if field == "cors_origins" else "store"
        parser.add_argument(flag, dest=field, type=kind, default=None, action=action, help=help_text)
    parser.set_defaults(run=run_serve)


def _settings_error(exc) -> ValueError:
    """One line naming the flag, its allowed range and the value, from a pydantic ValidationError."""
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else "settings"
    named = {"verify": "--no-verify", "preload": "--no-preload", "cors_origins": "--cors-origin"}
    flag = next((f for f, (name, _, _) in _FLAGS.items() if name == field),
                named.get(field, f"--{field.replace('_', '-')}"))
    return ValueError(f"{flag} (or EDGEMOE_{field.upper()}): {first['msg'].lower()}, got {first.get('input')!r}")


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when the address is taken (uvicorn would exit later with a raw error)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port with --port "
                             "or stop the process using it") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from edgemoe.runtime.expert_store import BudgetTooSmallError
    from edgemoe.runtime.loading import resolve_budget, resolve_bundle
    from edgemoe.runtime.kernels import runtime_manifest
    from edgemoe.server.app import create_app
    from edgemoe.server.settings import ServerSettings

    overrides = {field: getattr(args, field) for field, _, _ in _FLAGS.values() if getattr(args, field) is not None}
    if args.bundle is not None:
        overrides["bundle"] = args.bundle
    if args.expert_budget is not None:
        overrides["expert_budget"] = args.expert_budget
    if args.threads != 0 or "EDGEMOE_THREADS" not in os.environ:
        overrides["threads"] = args.threads
    if args.no_verify:
        overrides["verify"] = False
    # The model arguments shared with generate and eval; their environment twins apply when the
    # flag keeps its default.
    defaults = {"eviction": "lru", "predictor": "auto", "preload_depth": 1}
    for field, default in defaults.items():
        if getattr(args, field) != default:
            overrides[field] = getattr(args, field)
    if args.no_preload:
        overrides["preload"] = False
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        raise _settings_error(exc) from None
    # Fail now on a bad bundle or budget rather than serving a model that will never load.
    bundle = resolve_bundle(settings.bundle)
    manifest = runtime_manifest(bundle)
    budget = resolve_budget(settings.expert_budget, manifest)
    if budget < manifest.min_expert_budget:
        raise BudgetTooSmallError(
            f"expert budget {budget} bytes is smaller than one layer's top-{manifest.config.num_experts_per_tok} "
            f"experts ({manifest.min_expert_budget} bytes); set --expert-budget to at least "
            f"{manifest.min_expert_budget} bytes ({manifest.min_expert_budget / 1e6:.2f} MB)")
    settings.bundle = str(bundle)
    _check_port_free(settings.host, settings.port)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning("serving on %s without an API key: anyone on the network can use this server; "
                       "set --api-key or EDGEMOE_API_KEY", settings.host)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0
