"""How well M1 judges on the ifworld experiment's held-out items, per judge mode and template: does it score the
world's response that follows every instruction above the one built with an instruction left out? (0.5 = chance.)

    python scripts/ifworld_judges.py REGISTRY [N_ITEMS] [OUT.json]

REGISTRY holds a finished `flywheel experiment ifworld` (its M1). Compares the prob judge with prompts/judge_if.txt
(the experiment's), with prompts/judge_compact.txt, and verify mode with the world's checklist and with one generic
requirement. Prints and writes agreement, unscored items and the mean score of right and wrong replies.
"""
import json
import sys
import time
from pathlib import Path
from flywheel.analysis.experiment import load_experiment, variant_config
from flywheel.registry import Registry
from flywheel.registry.integrity import model_path
from flywheel.backends import make_backend
from flywheel.stages.judge import verdicts, read_judge_template

root = Path(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
exp = load_experiment("configs/experiments/ifworld.yaml", [f"eval.judge_problems={n}"])
task = exp.the_task
files = task.write(0, root / "experiments" / exp.name / "world-seed0")
test = task.test_set(files)
items = task.judge_items(0, files, test, n)
with Registry(root, read_only=True) as reg:
    m1 = reg.rows("SELECT model_id, path FROM models WHERE name = 'M1' LIMIT 1")[0]
    m1p = model_path(reg, m1["model_id"])
out = {}
for label, overrides in [("prob judge_if", {}), ("prob judge_compact", {"template": "prompts/judge_compact.txt"}),
                         ("verify checklist", {"mode": "verify", "checklist": "flywheel.analysis.ifworld:checklist"}),
                         ("verify generic", {"mode": "verify"})]:
    cfg = variant_config(exp, "rule-oracle", 0, root, files)
    cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update=overrides)})
    if "template" in overrides:
        cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"template": Path(overrides["template"]).resolve()})})
    t0 = time.time()
    backend = make_backend(cfg.generate, m1p, "cpu", ray=cfg.ray)
    tpl = read_judge_template(cfg.judge)
    flat = [(x, y, ref) for x, r, w, ref in items for y in (r, w)]
    args = flat if cfg.judge.mode == "verify" else [(x, y) for x, y, _ in flat]
    scores = [v.score for i in range(0, len(args), 8) for v in verdicts(backend, tpl, args[i:i + 8], cfg.judge, i)]
    wins = [0.5 if a is None or b is None else (1.0 if a > b else 0.5 if a == b else 0.0) for a, b in zip(scores[0::2], scores[1::2])]
    out[label] = {"agreement": sum(wins) / len(wins), "items": len(wins), "unscored": sum(s is None for s in scores),
                  "mean_right": sum(s for s in scores[0::2] if s is not None) / max(1, sum(s is not None for s in scores[0::2])),
                  "mean_wrong": sum(s for s in scores[1::2] if s is not None) / max(1, sum(s is not None for s in scores[1::2])),
                  "seconds": round(time.time() - t0, 1)}
    print(label, out[label], flush=True)
Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/judgecmp.json").write_text(json.dumps(out, indent=1))
