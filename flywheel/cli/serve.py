"""`flywheel serve`: serve local models over an OpenAI-compatible HTTP API (see flywheel/backends/serve.py).

    flywheel serve --models-dir data_registry/models            every registered model, by its registry path
    flywheel serve --model path/to/model [--model other] --port 8001
    FLYWHEEL_SERVE_KEY=... flywheel serve --model m --host 0.0.0.0 --api-key-env FLYWHEEL_SERVE_KEY   # exposed

Then point a run at it: `generate.backend=openai generate.openai.base_url=http://127.0.0.1:8000/v1` (and
`generate.openai.api_key_env=FLYWHEEL_SERVE_KEY` with a key). Every limit of `ServeLimits` is a flag (`--help`).
SIGTERM or Ctrl-C stops a running generation at once and exits within seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import console


def _serve(args) -> int:
    if not args.model and args.models_dir is None:
        raise ValueError("flywheel serve needs --model PATH (repeatable) and/or --models-dir DIR")
    key = None
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    import uvicorn

    from ..backends.models import resolve_device
    from ..backends.serve import ServeLimits, create_app

    given = {field: getattr(args, field) for field in _LIMITS if getattr(args, field) is not None}
    limits = ServeLimits(**given)  # ValueError names a bad limit
    app = create_app(args.model, args.models_dir, resolve_device(args.device), limits, key)  # or a bad path

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.line.close()  # stop the running generation now, so its connection closes and uvicorn can exit
            super().handle_exit(sig, frame)

    url = f"http://{args.host}:{args.port}/v1"
    names = app.state.store.names()
    console.print(f"[bold]flywheel serve[/] {len(names)} model(s) at [cyan]{url}[/]", highlight=False)
    for name in names:
        console.print(f"  {name}", highlight=False, soft_wrap=True)
    auth = f"a bearer token from ${args.api_key_env}" if key else "none (anyone who can reach the port may use it)"
    console.print(f"Auth: {auth}. Limits: {limits}; at most {args.max_connections} connections", highlight=False,
                  soft_wrap=True)
    use = f"generate.backend=openai generate.openai.base_url={url}"
    if key:
        use += f" generate.openai.api_key_env={args.api_key_env}"
    console.print(f"Use it: {use}", highlight=False, soft_wrap=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.max_connections,
                          timeout_graceful_shutdown=5)).run()
    return 0


# ServeLimits' fields, their flags and help; the defaults (in the help too; tests/test_serve.py checks that they match)
# come from ServeLimits, imported only when the command runs (it brings torch)
_LIMITS = {
    "max_body_bytes": ("--max-body-bytes", int, "larger request bodies get 413 (default 1048576)"),
    "max_prompt_tokens": ("--max-prompt-tokens", int,
                          "tokens per prompt, also capped by the model's context (400; default 2048)"),
    "max_tokens": ("--max-tokens", int, "the largest max_tokens a request may ask (400; default 1024)"),
    "max_choices": ("--max-choices", int, "n x prompts in one request (400; default 64)"),
    "max_queue": ("--max-queue", int,
                  "requests waiting for the model while one generates; more get 429 with Retry-After (default 8)"),
    "timeout_s": ("--timeout", float, "seconds a generation may run: then it is stopped, answering 504 (default 60.0)"),
}


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve local models over an OpenAI-compatible HTTP API")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="a model folder, served under this path as its name (repeatable)")
    p.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                   help="also serve every model folder under DIR, loaded on demand (e.g. data_registry/models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--api-key-env", default=None, metavar="NAME",
                   help="require 'Authorization: Bearer <key>' on every endpoint, the key read from environment "
                        "variable NAME (never printed)")
    for field, (flag, kind, text) in _LIMITS.items():
        p.add_argument(flag, dest=field, type=kind, default=None, help=text)
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections at once, each holding up to --max-body-bytes; more get 503 (default 64)")
    p.set_defaults(func=_serve)
