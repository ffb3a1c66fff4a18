"""Versioned datasets (issue 5): being written. `freeze_stage_outputs` is called by run_stage after each stage."""


def freeze_stage_outputs(reg, stage, stage_run_id, *, run_id, iteration, inputs, config_hash):
    return {}
