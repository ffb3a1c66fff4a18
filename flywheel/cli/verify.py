"""`flywheel verify`: check that every registered model and dataset version is still what the registry recorded.

    flywheel verify [--registry DIR]

Models: the folder is there and its weight files hash to `models.weights_sha256` (flywheel/registry/integrity.py).
A model registered without a hash (before models were hashed) is reported as not checked, and a hub id base as not
local; neither counts as a failure. Datasets: each version's Parquet file holds exactly the rows it was frozen with
(`read_version`). Prints one line per model and dataset version, then each problem with the command that restores
it. Exit status 0 when everything checked is intact, 1 when anything is missing or altered. Read-only: it never
stops a running flywheel.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from . import add_registry_arg, console

STYLE = {"ok": "green", "unchecked": "yellow", "hub": "yellow", "missing": "red", "altered": "red"}
LABEL = {"ok": "ok", "unchecked": "not checked", "hub": "not local", "missing": "MISSING", "altered": "ALTERED"}


def check_registry(reg) -> list[dict]:
    """One dict per model and dataset version: kind, name, id, run, status, detail and (for a problem) fix."""
    from ..registry.datasets import DatasetError, read_version
    from ..registry.integrity import check_model, restore_hint

    found = []
    for row in reg.rows("SELECT * FROM models ORDER BY created_at, model_id"):
        check = check_model(row, reg.root)
        found.append(dict(kind="model", name=row["name"], id=row["model_id"], run=row["run_id"], path=check.path,
                          status=check.status, detail=check.detail,
                          fix=restore_hint(row, check, reg.root) if check.bad else None))
    for row in reg.rows("SELECT version_id, name, run_id, path FROM dataset_versions ORDER BY created_at, version_id"):
        path = reg.root / row["path"]
        try:
            read_version(reg, row["version_id"])
            status, detail = "ok", ""
        except DatasetError as e:  # DatasetIntegrityError: missing, unreadable or altered
            status = "missing" if not path.is_file() else "altered"
            detail = str(e).split("; `flywheel datasets restore")[0]
        found.append(dict(kind="dataset", name=row["name"], id=row["version_id"], run=row["run_id"], path=str(path),
                          status=status, detail=detail,
                          fix=(f"`flywheel datasets restore {row['version_id']} --registry {reg.root}` rewrites it "
                               "from the registry rows") if status != "ok" else None))
    return found


def _verify(args) -> int:
    from rich.table import Table

    from ..registry import reader

    root: Path = args.registry
    with reader(root) as reg:
        found = check_registry(reg)
    console.print(f"registry {escape(str(root))}", highlight=False, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for col in ("kind", "name", "id", "status"):
        table.add_column(col, no_wrap=col != "name")
    for f in found:
        s = f["status"]
        table.add_row(f["kind"], f["name"], f["id"], f"[{STYLE[s]}]{LABEL[s]}[/]")
    console.print(table)
    bad = [f for f in found if f["status"] in ("missing", "altered")]
    unchecked = [f for f in found if f["status"] in ("unchecked", "hub")]
    for f in unchecked:
        console.print(f"[yellow]note:[/] {f['kind']} {escape(f['name'])} ({f['id']}): {escape(f['detail'])}",
                      highlight=False, soft_wrap=True)
    for f in bad:
        console.print(f"[red]{LABEL[f['status']]}:[/] {f['kind']} {escape(f['name'])} ({f['id']}, run {f['run']}): "
                      f"{escape(f['detail'])}", highlight=False, soft_wrap=True)
        console.print(f"  to restore: {escape(f['fix'])}", highlight=False, soft_wrap=True)
    models = sum(f["kind"] == "model" for f in found)
    summary = (f"{models} model(s), {len(found) - models} dataset version(s): "
               f"{sum(f['status'] == 'ok' for f in found)} intact, {len(unchecked)} not checked, {len(bad)} missing "
               "or altered")
    console.print(("[red]" if bad else "[green]") + summary + "[/]", highlight=False, soft_wrap=True)
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser("verify", help="check every model's weights and every dataset version against the registry")
    add_registry_arg(p)
    p.set_defaults(func=_verify)
