"""The step-level self-judge on a real model: on the arithmetic world's held-out problems, does the model give a
parseable verdict on each step, and does its verdict agree with the step rule (the ground truth)?

    python scripts/step_judge_real.py MODEL_DIR [N_PROBLEMS] [SAMPLES] [OUT.json] [MAX_NEW_TOKENS]

MODEL_DIR is a Hugging Face model folder (e.g. a registry's converted SmolLM2 base, <registry>/models/base-...).
Each of the first N test problems of the arith world (seed 0) is answered twice, by its true chain and by a near miss
(one step's result off, later steps carried on from it); every step of both is judged by `step_verdicts` with
prompts/step_judge.txt (the strict 'Verdict: correct|incorrect' parser) and labelled by `arithworld.step_check`.
Prints parse failures by reason, and, over the steps with a verdict, the agreement with the rule and the share judged
correct among right and among wrong steps.
"""
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from flywheel.analysis import arithworld as aw
from flywheel.backends import make_backend
from flywheel.config import load_config
from flywheel.stages import steps as st

model_dir = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
samples = int(sys.argv[3]) if len(sys.argv) > 3 else 1
tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 64  # steps.judge_max_new_tokens (its default)
cfg = load_config(None, ["steps.split=line", "steps.judge=true", f"steps.judge_samples={samples}",
                         f"steps.judge_max_new_tokens={tokens}",
                         "steps.judge_batch_size=16", "run.device=cpu"])
template = st.check_step_judge(cfg)
world = aw.ArithWorld(aw.ArithSizes(test=max(n, 10), seeds=10, pool=10, corpus_docs=1), seed=0)
rng = random.Random("step-judge-real")
items, labels = [], []
for problem in world.problems()["test"][:n]:
    prompt = aw.prompt_of(problem)
    for chain in (aw.solution_of(problem), aw.near_miss_chain(problem, rng)):
        steps = [s.text for s in st.split_steps(chain, cfg.steps)]
        truth = aw.step_check(prompt, None, steps)
        for k in range(len(steps)):
            items.append((prompt, steps, k))
            labels.append(truth[k])
t0 = time.time()
backend = make_backend(cfg.generate, model_dir, "cpu")
found = st.step_verdicts(backend, template, items, cfg.steps, seed=0)
seconds = time.time() - t0
errors = Counter(e for v in found for e in v.errors if e)
scored = [(v.value, y) for v, y in zip(found, labels) if v.value is not None]
right = [v for v, y in scored if y == 1.0]
wrong = [v for v, y in scored if y == 0.0]
out = {"model": model_dir, "problems": n, "steps": len(items), "samples_per_step": samples, "max_new_tokens": tokens,
       "samples": len(items) * samples, "parse_failures": dict(errors), "steps_with_verdict": len(scored),
       "agreement": sum((v >= 0.5) == (y == 1.0) for v, y in scored) / len(scored) if scored else None,
       "judged_correct_among_right_steps": sum(right) / len(right) if right else None,
       "judged_correct_among_wrong_steps": sum(wrong) / len(wrong) if wrong else None,
       "right_steps": sum(labels), "wrong_steps": len(labels) - sum(labels), "seconds": round(seconds, 1),
       "example": {"prompt": st.step_judge_prompt(template, *items[1]), "reply": found[1].raw[0]}}
print(json.dumps(out, indent=1))
Path(sys.argv[4] if len(sys.argv) > 4 else "/tmp/step_judge_real.json").write_text(json.dumps(out, indent=1))
