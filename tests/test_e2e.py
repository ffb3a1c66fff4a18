"""The whole flywheel through Prefect's local API on a real DuckDB file: seeds -> PT -> M1 -> M2 -> M3.

Real tokenizer training, real generation, real TRL SFT and DPO steps on a tiny model (tests/small.yaml). The asserts
are on what landed in the registry.
"""

import json
from pathlib import Path

import pytest

from flywheel.cli import main as cli_main
from flywheel.config import load_config
from flywheel.registry import Registry

pytestmark = pytest.mark.slow  # the real Prefect flow: tokenizer, pretraining, SFT and DPO on a tiny model

TABLES = ["runs", "iterations", "stage_runs", "run_stages", "templates", "models", "prompts", "candidates",
          "judgments", "pairs"]


@pytest.fixture(scope="module")
def finished_run(prefect_api, tmp_path_factory):
    from flows.flywheel_flow import flywheel_flow

    root = tmp_path_factory.mktemp("registry")
    cfg = load_config("tests/small.yaml", [f"registry.root={root}"])
    run_id = flywheel_flow(cfg)
    return cfg, run_id


def test_three_model_versions_in_a_chain(finished_run):
    cfg, run_id = finished_run
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "done"
        models = {m["name"]: m for m in reg.rows("SELECT * FROM models")}
        assert sorted(models) == ["M1", "M2", "M3", "PT"]
        assert [models[n]["kind"] for n in ("PT", "M1", "M2", "M3")] == ["base", "sft", "dpo", "dpo"]
        assert models["M1"]["parent_id"] == models["PT"]["model_id"]
        assert models["M2"]["parent_id"] == models["M1"]["model_id"]
        assert models["M3"]["parent_id"] == models["M2"]["model_id"]
        for m in models.values():
            assert (Path(m["path"]) / "model.safetensors").is_file()
            assert (Path(m["path"]) / "tokenizer.json").is_file()
        its = reg.rows("SELECT * FROM iterations WHERE run_id = ? ORDER BY iteration", [run_id])
        assert [(i["iteration"], i["status"]) for i in its] == [(1, "done"), (2, "done")]
        assert [(i["model_in"], i["model_out"]) for i in its] == [
            (models["M1"]["model_id"], models["M2"]["model_id"]), (models["M2"]["model_id"], models["M3"]["model_id"])]


def test_pairs_prefer_the_higher_mean_judge_score(finished_run):
    cfg, _ = finished_run
    with Registry(cfg.registry.root) as reg:
        pairs = reg.rows("SELECT * FROM pairs")
        assert {p["iteration"] for p in pairs} == {1, 2}
        for p in pairs:
            assert p["chosen_score"] > p["rejected_score"]
            for cid, score in ((p["chosen_id"], p["chosen_score"]), (p["rejected_id"], p["rejected_score"])):
                valid = [r["score"] for r in reg.rows(
                    "SELECT score FROM judgments WHERE candidate_id = ? AND score IS NOT NULL", [cid])]
                assert score == pytest.approx(sum(valid) / len(valid))
                assert reg.scalar("SELECT prompt_id FROM candidates WHERE candidate_id = ?", [cid]) == p["prompt_id"]
        # no prompt yields two pairs, and no pair was built from a prompt whose candidates all tie
        assert len({(p["iteration"], p["prompt_id"]) for p in pairs}) == len(pairs)


def test_counts_add_up_and_rows_record_their_origin(finished_run):
    cfg, run_id = finished_run
    n, k = cfg.generate.n, cfg.judge.samples
    with Registry(cfg.registry.root) as reg:
        stages = {(r["iteration"], r["stage"]): r for r in reg.rows(
            "SELECT rs.iteration, rs.stage, s.* FROM run_stages rs JOIN stage_runs s USING (stage_run_id) "
            "WHERE rs.run_id = ?", [run_id])}
        assert all(s["status"] == "done" for s in stages.values())
        for t in (1, 2):
            model_in = reg.scalar("SELECT model_in FROM iterations WHERE iteration = ?", [t])
            si, gen, jd, pr = (stages[(t, s)]["stage_run_id"] for s in ("self_instruct", "generate", "judge", "pairs"))
            attempted, kept = reg.rows("SELECT count(*) AS a, count(*) FILTER (WHERE kept) AS k FROM prompts "
                                       "WHERE stage_run_id = ?", [si])[0].values()
            assert attempted == cfg.self_instruct.num_prompts and kept > 0
            assert reg.scalar("SELECT count(*) FROM prompts WHERE stage_run_id = ? AND NOT kept "
                              "AND drop_reason IS NULL", [si]) == 0
            assert reg.scalar("SELECT count(*) FROM candidates WHERE stage_run_id = ?", [gen]) == kept * n
            assert reg.scalar("SELECT count(*) FROM judgments WHERE stage_run_id = ?", [jd]) == kept * n * k
            # a judgment has a score or a parse error, never both, never neither
            assert reg.scalar("SELECT count(*) FROM judgments WHERE stage_run_id = ? "
                              "AND (score IS NULL) = (parse_error IS NULL)", [jd]) == 0
            failures = reg.scalar("SELECT count(*) FROM judgments WHERE stage_run_id = ? AND score IS NULL", [jd])
            assert failures < kept * n * k  # some judgments parse
            assert json.loads(stages[(t, "judge")]["stats"])["parse_failures"] == failures
            pairs = reg.scalar("SELECT count(*) FROM pairs WHERE stage_run_id = ?", [pr])
            assert 0 < pairs <= kept
            assert json.loads(stages[(t, "dpo")]["stats"])["pairs"] == pairs
            # provenance: M_t generated and judged this iteration's data
            assert reg.scalar("SELECT count(*) FROM candidates WHERE stage_run_id = ? AND model_id != ?",
                              [gen, model_in]) == 0
            assert reg.scalar("SELECT count(*) FROM judgments WHERE stage_run_id = ? AND judge_model_id != ?",
                              [jd, model_in]) == 0
            assert reg.scalar("SELECT count(DISTINCT template_hash) FROM judgments WHERE stage_run_id = ?", [jd]) == 1


def _iteration_flow_runs() -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["flywheel-iteration"]))))


def test_running_again_through_the_cli_changes_nothing(finished_run, capsys):
    cfg, run_id = finished_run
    with Registry(cfg.registry.root) as reg:
        before = {t: reg.scalar(f"SELECT count(*) FROM {t}") for t in TABLES}
        finished = reg.rows("SELECT stage_run_id, finished_at FROM stage_runs ORDER BY 1")
    iteration_runs = _iteration_flow_runs()
    assert cli_main(["run", "--config", "tests/small.yaml", f"registry.root={cfg.registry.root}"]) == 0
    assert _iteration_flow_runs() == iteration_runs  # finished iterations are skipped whole, no subflow run
    with Registry(cfg.registry.root) as reg:
        assert {t: reg.scalar(f"SELECT count(*) FROM {t}") for t in TABLES} == before
        assert reg.rows("SELECT stage_run_id, finished_at FROM stage_runs ORDER BY 1") == finished
    out = capsys.readouterr().out
    assert run_id in out and "M2 -> M3" in out and "parse failures" in out
    assert (Path(cfg.registry.root) / "runs" / run_id / "report.md").is_file()


def test_a_new_judge_setting_reuses_prompts_and_candidates(finished_run, prefect_api):
    """Stage keys hash each stage's own inputs: with 3 judge samples instead of 2, self-instruct and generation
    are reused as they are, and judging, pairs and DPO run again (a new run, new M2 and M3)."""
    from flows.flywheel_flow import flywheel_flow

    cfg, run_id = finished_run
    changed = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"samples": 3})})
    count_by_iteration = "SELECT iteration, count(*) AS n FROM {} GROUP BY ALL ORDER BY ALL"
    with Registry(cfg.registry.root) as reg:
        before = {t: reg.rows(count_by_iteration.format(t)) for t in ("prompts", "candidates")}
        models = reg.scalar("SELECT count(*) FROM models")
    new_run = flywheel_flow(changed)
    assert new_run != run_id
    with Registry(cfg.registry.root) as reg:
        for t in ("prompts", "candidates"):
            after = {r["iteration"]: r["n"] for r in reg.rows(count_by_iteration.format(t))}
            old = {r["iteration"]: r["n"] for r in before[t]}
            assert {i: n for i, n in after.items() if i < 2} == {i: n for i, n in old.items() if i < 2}
            assert after[2] > old[2]  # iteration 2 made new prompts (and candidates) with the new M2
        assert reg.scalar("SELECT count(*) FROM models") == models + 2
        stages = reg.rows("SELECT stage, count(DISTINCT stage_run_id) AS n FROM run_stages "
                          "WHERE run_id IN (?, ?) GROUP BY stage ORDER BY stage", [run_id, new_run])
        assert {s["stage"]: s["n"] for s in stages} == {
            "seeds": 1, "base": 1, "sft": 1, "self_instruct": 3, "generate": 3, "judge": 4, "pairs": 4, "dpo": 4}
        # iteration 1 is shared entirely up to generation; iteration 2's prompts come from the new M2, so it differs
        shared = reg.rows("SELECT a.stage FROM run_stages a JOIN run_stages b USING (iteration, stage, stage_run_id) "
                          "WHERE a.run_id = ? AND b.run_id = ? ORDER BY a.iteration, a.stage", [run_id, new_run])
        assert [s["stage"] for s in shared] == ["base", "seeds", "sft", "generate", "self_instruct"]


def test_the_flow_publishes_its_report_as_files_and_a_prefect_artifact(finished_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, run_id = finished_run
    out = Path(cfg.registry.root) / "runs" / run_id
    assert {"report.md", "report.json", "curves.png", "scores-1.png", "scores-2.png"} <= {p.name for p in out.iterdir()}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flywheel-report"])))
    texts = [a.data for a in artifacts if run_id in a.data]
    assert texts and all(a.type == "markdown" for a in artifacts)
    assert "## Monitors" in texts[0] and "### Iteration 1" in texts[0] and "### Iteration 2" in texts[0]
    assert "![" not in texts[0]  # the artifact has no images; the file beside them does
