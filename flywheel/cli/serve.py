"""`flywheel serve`: serve local models over an OpenAI-compatible HTTP API (see flywheel/backends/serve.py).

    flywheel serve --models-dir data_registry/models            every registered model, by its registry path
    flywheel serve --model path/to/model [--model other] --port 8001

Then point a run at it: `generate.backend=openai generate.openai.base_url=http://127.0.0.1:8000/v1`.
"""

from __future__ import annotations

from pathlib import Path

from . import console


def _serve(args) -> int:
    if not args.model and args.models_dir is None:
        raise ValueError("flywheel serve needs --model PATH (repeatable) and/or --models-dir DIR")
    import uvicorn

    from ..backends.models import resolve_device
    from ..backends.serve import create_app

    app = create_app(args.model, args.models_dir, resolve_device(args.device))  # ValueError names a bad path
    url = f"http://{args.host}:{args.port}/v1"
    names = app.state.store.names()
    console.print(f"[bold]flywheel serve[/] {len(names)} model(s) at [cyan]{url}[/]", highlight=False)
    for name in names:
        console.print(f"  {name}", highlight=False, soft_wrap=True)
    console.print(f"Use it: generate.backend=openai generate.openai.base_url={url}", highlight=False, soft_wrap=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve local models over an OpenAI-compatible HTTP API")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="a model folder, served under this path as its name (repeatable)")
    p.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                   help="also serve every model folder under DIR, loaded on demand (e.g. data_registry/models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_serve)
