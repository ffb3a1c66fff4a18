"""The data stages of an iteration, each a function that calls `flywheel.stage.run_stage`.

    bootstrap.py      iteration 0: seeds imported (seeds.py: the seed formats), the base model (PT)
    self_instruct.py  new prompts from few-shot seed prompts; near-duplicates dropped (dedup.py)
    generate.py       N candidates per kept prompt
    judge.py          the LLM-as-a-Judge verdicts (score_parser.py reads them); verify mode: yes/no per requirement
    meta_judge.py     (optional) M_t judges its own judgments: judge-preference pairs for DPO
    reward.py         the coherent and rule rewards (flywheel/signals.py computes them); process rewards: steps and
                      step rewards (steps.py: splitting, the step rule, the step judge, aggregation)
    pairs.py          best vs worst per prompt, in SQL (optionally anchored: rejected from M1), or step-wise pairs
                      (two candidates parting at a step); the frozen training set

`flywheel/pipeline.py` says in which order they run and what each reads; training is in flywheel/training/.
"""
