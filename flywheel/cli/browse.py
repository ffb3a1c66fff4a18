"""`flywheel browse [--registry DIR] [--port N] [--host 127.0.0.1]`: read pairs, their judge samples and lineage in
a local web page, and label them (flywheel/browse/). Never stops a running flywheel: pages open the registry read-only
for each request, and a label is refused with "registry busy, try again" while a run holds the registry.

    flywheel browse                                       http://127.0.0.1:8050/
    flywheel browse --export-argilla RUN_ID:2 --out DIR   iteration 2's pairs as Argilla 2.x records (no server)
"""

from __future__ import annotations

from pathlib import Path

from . import add_registry_arg, console


def _browse(args) -> int:
    if args.export_argilla:
        from ..browse.export import export_argilla
        from ..registry import reader

        if args.out is None:
            raise ValueError("--export-argilla needs --out DIR")
        with reader(args.registry) as reg:
            done = export_argilla(reg, args.export_argilla, args.out)
        console.print(f"{done['records']} records of pairs stage {done['pairs_stage_run_id']} -> {args.out}/"
                      f"{{{', '.join(done['files'])}}}", highlight=False, soft_wrap=True)
        return 0
    from ..browse.server import make_server

    try:
        server = make_server(args.registry, args.host, args.port)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pass --port N") from None
    host, port = server.server_address[:2]
    console.print(f"flywheel browse: http://{'[' + host + ']' if ':' in host else host}:{port}/ over registry "
                  f"{args.registry} (read-only; Ctrl-C stops)", highlight=False, soft_wrap=True)
    if host not in ("127.0.0.1", "::1"):
        console.print(f"[yellow]warning:[/] bound to {host}: other machines can read this registry and label pairs")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("browse", help="a local web page over the registry's pairs, judge samples and lineage")
    add_registry_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="default 8050; 0 picks a free port")
    p.add_argument("--export-argilla", metavar="WHICH",
                   help="write pairs as Argilla 2.x records instead of serving: RUN_ID:ITERATION, ITERATION (newest "
                        "run) or a pairs stage run id")
    p.add_argument("--out", type=Path, help="the folder --export-argilla writes to")
    p.set_defaults(func=_browse)
