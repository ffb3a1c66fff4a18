"""The registry: what a run keeps, and how it is read back.

    store.py      `Registry`: the DuckDB file (tables, ledger, models), one writing process at a time
    lock.py       `registry_lock`: one run at a time writes a registry
    datasets.py   immutable, content-hashed Parquet versions of every stage's output
    runs.py       run ids and the runs' rows;  reads.py: reads several stages share
    lineage.py    a pair's or a model's whole history
"""

from .store import Registry, RegistryLockedError, RegistrySchemaError, now

__all__ = ["Registry", "RegistryLockedError", "RegistrySchemaError", "now"]
