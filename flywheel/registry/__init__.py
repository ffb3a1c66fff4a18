"""The registry: what a run keeps, and how it is read back.

    store.py      `Registry`: the DuckDB file (tables, ledger, models), opened only while used; `reader`: read-only
    base.py       the errors of opening a registry (locked, damaged, missing, old schema)
    lock.py       `registry_lock`: one run at a time writes a registry
    datasets.py   immutable, content-hashed Parquet versions of every stage's output
    runs.py       run ids and the runs' rows;  reads.py: reads several stages share
    lineage.py    a pair's or a model's whole history
"""

from .store import (Registry, RegistryDamagedError, RegistryLockedError, RegistryMissingError, RegistrySchemaError,
                    now, reader)

__all__ = ["Registry", "RegistryDamagedError", "RegistryLockedError", "RegistryMissingError", "RegistrySchemaError",
           "now", "reader"]
