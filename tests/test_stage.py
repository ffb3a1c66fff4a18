"""The stage ledger on a real DuckDB file: done stages are skipped, failed ones recorded and resumed."""

import pytest

from flywheel.registry import Registry
from flywheel.stage import run_stage


def test_done_stage_is_skipped_without_calling_work(cfg):
    calls = []

    def work(reg, sid):
        calls.append(sid)
        return {"n": 3}

    first = run_stage(cfg, "demo", "run-a", 1, None, {"x": 1}, work)
    second = run_stage(cfg, "demo", "run-a", 1, None, {"x": 1}, work)
    other = run_stage(cfg, "demo", "run-a", 1, None, {"x": 2}, work)
    assert calls == [first.stage_run_id, other.stage_run_id]
    assert second.skipped and second.stats == first.stats and second.stats["n"] == 3
    assert second.stage_run_id == first.stage_run_id and "compute_s" in first.stats
    assert other.stage_run_id != first.stage_run_id


def test_failure_is_recorded_and_the_next_run_resumes(cfg):
    def boom(reg, sid):
        reg.insert("templates", [dict(template_hash="t1", name="kept", text="finished work", created_at="2026-01-01")])
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        run_stage(cfg, "demo", "run-a", 1, None, {"x": 1}, boom)
    with Registry(cfg.registry.root) as reg:
        row = reg.rows("SELECT status, error FROM stage_runs")[0]
        assert row["status"] == "failed" and "disk on fire" in row["error"]
        assert reg.scalar("SELECT count(*) FROM templates") == 1  # work committed before the crash is kept

    result = run_stage(cfg, "demo", "run-a", 1, None, {"x": 1}, lambda reg, sid: {"resumed": True})
    assert not result.skipped and result.stats["resumed"] is True
    with Registry(cfg.registry.root) as reg:
        assert reg.rows("SELECT status FROM stage_runs") == [{"status": "done"}]
        assert reg.rows("SELECT run_id, iteration, stage FROM run_stages") == [
            {"run_id": "run-a", "iteration": 1, "stage": "demo"}]


def test_insert_ignores_existing_keys(cfg):
    with Registry(cfg.registry.root) as reg:
        row = dict(template_hash="t1", name="a", text="one", created_at="2026-01-01")
        reg.insert("templates", [row])
        reg.insert("templates", [{**row, "text": "two"}])
        assert reg.rows("SELECT text FROM templates") == [{"text": "one"}]
