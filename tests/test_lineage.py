"""Lineage of pairs, models and dataset versions on a real registry filled stage by stage (tests/helpers/staged.py)."""

import json

import pytest

from flywheel import cli
from flywheel.config import content_hash
from flywheel.registry import Registry
from flywheel.registry.lineage import LineageError, lineage, render
from tests.helpers.staged import JUDGE_TEMPLATE, PROMPTS, SAMPLING, SEEDS, build_flywheel
from tests.helpers.staged import versions as _versions


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory):
    """Run a: two iterations, DPO records the train version it read. Run b: one iteration with another judge,
    whose DPO records nothing (so only the run's stages link its model to the pairs)."""
    root = tmp_path_factory.mktemp("registry")
    a = build_flywheel(root, run_id="run-a", iterations=2)
    b = build_flywheel(root, run_id="run-b", variant=1, link_dataset=False)
    return root, a, b


def _json_cli(capsys, *argv) -> dict:
    capsys.readouterr()
    assert cli.main(["lineage", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_pair_lineage_has_every_piece(flywheel, capsys):
    root, a, _ = flywheel
    with Registry(root) as reg:
        pair_id = reg.scalar("SELECT pair_id FROM pairs p JOIN prompts q USING (prompt_id) "
                             "WHERE p.stage_run_id = ? AND q.text = ?", [a["pairs:1"].stage_run_id, PROMPTS[1][0]])
        shots = [r["text"] for r in reg.rows("SELECT text FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id "
                                             "LIMIT 2", [a["seeds"].stage_run_id])]
    r = _json_cli(capsys, pair_id, "--registry", str(root))
    m1, m2 = a["sft"].stage_run_id, a["dpo:1"].stage_run_id
    assert r["kind"] == "pair" and r["pair"]["pair_id"] == pair_id

    # the prompt: written by M1 by self-instruct, from few-shot seed prompts
    p = r["prompt"]
    assert (p["text"], p["source"], p["model"]["name"], p["model"]["model_id"]) == (PROMPTS[1][0], "self_instruct",
                                                                                   "M1", m1)
    assert [s["text"] for s in p["few_shot"]] == shots and set(shots) <= {x[1] for x in SEEDS}
    assert p["dataset_versions"] == _versions(a["self_instruct:1"])

    # chosen and rejected: text, model, backend, sampling, seed; every judge sample; rewards; raw signal values
    ch, rj = r["chosen"], r["rejected"]
    assert (ch["text"], rj["text"]) == (f"answer 0 to {PROMPTS[1][0]}", f"answer 1 to {PROMPTS[1][0]}")
    for c in (ch, rj):
        assert c["model"]["name"] == "M1" and c["backend"] == "transformers" and c["sampling"] == SAMPLING
        assert isinstance(c["seed"], int) and c["dataset_versions"] == _versions(a["generate:1"])
        assert [j["sample_index"] for j in c["judgments"]] == [0, 1]
        assert {j["template_hash"] for j in c["judgments"]} == {content_hash(JUDGE_TEMPLATE)}
        assert {j["template_name"] for j in c["judgments"]} == {"judge"}
        assert {j["judge_model"]["name"] for j in c["judgments"]} == {"M1"}
        assert [x["signal"] for x in c["rewards"]] == ["coherent"]
        assert c["rewards"][0]["details"]["tokens"] == c["num_tokens"]
        assert c["signals"]["coherent"] == c["rewards"][0]["value"]
    assert [j["score"] for j in ch["judgments"]] == [5.0, 5.0]
    assert [(j["score"], j["parse_error"], j["raw_text"]) for j in rj["judgments"]] == [
        (2.0, None, "Fine work. Score: 2"), (None, "no_score", "I cannot decide.")]
    assert (ch["score"], rj["score"]) == (5.0, 2.0)
    assert r["rule"] == {"weights": {"judge": 1.0}, "rho": 0.0}

    # the dataset versions it sits in, and the model trained on it (linked by its dataset_version)
    assert sorted(v["version_id"] for v in r["datasets"]) == sorted(_versions(a["pairs:1"]).values())
    assert [(m["model_id"], m["name"], m["dataset_version"], m["runs"]) for m in r["trained"]] == [
        (m2, "M2", _versions(a["pairs:1"])["train"], ["run-a"])]
    assert r["trained"][0]["stage_status"] == "done" and r["trained"][0]["metrics"] == {"loss": 0.5}


def test_a_model_found_through_its_runs_stages(flywheel):
    """Run b's DPO recorded no dataset_version: its model is still found, as the trainer of that run iteration."""
    root, _, b = flywheel
    with Registry(root) as reg:
        pair_id = reg.scalar("SELECT min(pair_id) FROM pairs WHERE stage_run_id = ?", [b["pairs:1"].stage_run_id])
        r = lineage(reg, pair_id)
    assert [(m["model_id"], m["dataset_version"]) for m in r["trained"]] == [(b["dpo:1"].stage_run_id, None)]
    assert r["chosen"]["judgments"][0]["stage_run_id"] == b["judge:1"].stage_run_id  # run b's judge, not run a's


def test_model_lineage_walks_back_to_the_base(flywheel, capsys):
    root, a, b = flywheel
    r = _json_cli(capsys, "M3", "--run", "run-a", "--registry", str(root))
    assert r["kind"] == "model"
    assert [(m["name"], m["kind"]) for m in r["chain"]] == [("M3", "dpo"), ("M2", "dpo"), ("M1", "sft"),
                                                              ("PT", "base")]
    trained_on = {m["name"]: m["trained_on"] for m in r["chain"]}
    assert trained_on == {"M3": [_versions(a["pairs:2"])["train"]], "M2": [_versions(a["pairs:1"])["train"]],
                          "M1": [_versions(a["seeds"])["seeds"]], "PT": []}
    # the datasets behind M3, back to the seeds (iteration 2's prompts also come from iteration 1's)
    expected = {v for k, res in a.items() if not k.startswith(("dpo", "base", "sft")) for v in _versions(res).values()}
    assert set(r["datasets"]) == expected
    assert r["datasets"][_versions(a["generate:2"])["candidates"]]["model_id"] == a["dpo:1"].stage_run_id

    # by id it is the same answer; a name in two runs needs --run; the model of run b links through its stages
    assert _json_cli(capsys, a["dpo:2"].stage_run_id, "--registry", str(root))["chain"] == r["chain"]
    with Registry(root) as reg:
        with pytest.raises(LineageError, match="pass --run"):
            lineage(reg, "M2")
        rb = lineage(reg, "M2", run="run-b")
    assert rb["model"]["model_id"] == b["dpo:1"].stage_run_id
    assert rb["chain"][0]["trained_on"] == [_versions(b["pairs:1"])["train"]]


def test_dataset_version_lineage(flywheel):
    root, a, _ = flywheel
    train = _versions(a["pairs:1"])["train"]
    with Registry(root) as reg:
        r = lineage(reg, train)
    assert r["kind"] == "dataset" and r["version"]["derived_from"] == [_versions(a["pairs:1"])["pairs"]]
    assert {d["name"] for d in r["datasets"].values()} == {"train", "pairs", "judgments", "rewards", "candidates",
                                                            "prompts", "seeds"}
    assert [m["name"] for m in r["trained"]] == ["M2"]


def test_cli_text_form_renders(flywheel, capsys):
    root, a, _ = flywheel
    with Registry(root) as reg:
        pair_id = reg.scalar("SELECT min(pair_id) FROM pairs WHERE stage_run_id = ?", [a["pairs:2"].stage_run_id])
        text = render(lineage(reg, pair_id))
    assert text.label.startswith("[bold]pair[/]")
    capsys.readouterr()
    assert cli.main(["lineage", pair_id, "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    for piece in ("prompt", "few-shot", "chosen", "rejected", "judge samples", "parse error: no_score", "coherent",
                  "rule", "in dataset versions", _versions(a["pairs:2"])["train"], "trained into", "M3 (dpo"):
        assert piece in out, piece
    assert cli.main(["lineage", "M3", "--run", "run-a", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    for piece in ("M3 (dpo", "from M2", "from M1", "from PT", _versions(a["seeds"])["seeds"]):
        assert piece in out, piece
    assert cli.main(["lineage", "pr-nothing", "--registry", str(root)]) == 2
    assert "is not a pair id, model id" in capsys.readouterr().out
