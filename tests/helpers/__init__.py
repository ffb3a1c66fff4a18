"""Helpers shared by the tests (test files import from here, never from each other):

- `models`: the one tiny-model factory (its sizes, a seed-trained tokenizer, random or format-taught tiny Llamas) and
  the config overrides of a tiny end-to-end run.
- `registry`: hand-written registry rows (prompt, candidate, judgment rows with defaults; a fast Arrow insert; ledger
  rows) and `build_run`, a whole run written row by row so every figure the report and monitors count is known.
- `staged`: `build_flywheel`, a run filled stage by stage through the real `run_stage` (dataset versions, lineage).
- `compare`: two registries compared table by table, weight by weight and version by version (the kill tests and
  bench/kill_harness.py), and the temp files a killed writer left.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root: configs, seeds and prompts are named from it
