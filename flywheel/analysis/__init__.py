"""Looking at runs: the report (report.py, with the reward-hacking monitors of monitors.py), the judge's agreement
with human rankings (eval_judge.py), and experiments with known truth (experiment.py on the mini-world of
miniworld.py)."""
