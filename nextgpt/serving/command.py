"""`nextgpt serve`: the OpenAI-compatible API under uvicorn (FastAPI loads only when it runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nextgpt.cli import DEFAULT_MODEL, UsageError, load_model
from nextgpt.config import PRESETS
from nextgpt.serving.limits import Limits

API_KEY_ENV = "NEXTGPT_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    defaults = Limits()
    p = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat-completions API with streaming",
        description="Serve POST /v1/chat/completions, GET /v1/models, /v1/files and /health.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name or model directory")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require this key (default: ${API_KEY_ENV})")
    p.add_argument(
        "--allow-remote-urls",
        action="store_true",
        help="let requests name http(s) media URLs for the server to fetch (off: data: URLs only)",
    )
    p.add_argument("--queue-size", type=int, default=defaults.queue_size)
    p.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / 2**20)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="diffusion steps")
    p.add_argument("--file-ttl", type=float, default=defaults.file_ttl_s, help="seconds")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535")
    for flag in ("queue_size", "max_request_mb", "max_new_tokens", "max_steps", "file_ttl"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        queue_size=args.queue_size,
        max_new_tokens=args.max_new_tokens,
        max_steps=args.max_steps,
        file_ttl_s=args.file_ttl,
    )
    model = load_model(args.model)
    import uvicorn

    from nextgpt.serving.app import create_app

    name = args.model if args.model in PRESETS else Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(model, name, limits, api_key=api_key, allow_remote_urls=args.allow_remote_urls)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"nextgpt: warning: serving on {args.host} without an API key", file=sys.stderr)
    print(f"serving {name!r}: OpenAI base_url http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
