"""LoRA: 'auto' decides by device and base; adapters trained by SFT are merged into the model, which saves and reloads
with identical logits; the micro-batch setting reaches the trainer."""

import pytest
import torch

from flywheel.backends.models import load, save_atomically
from flywheel.config import ConfigError, LoraConfig, load_config
from flywheel.stages.seeds import ift_examples, load_seeds
from flywheel.training.loops import _batches, sft_train
from tests.helpers.models import save_random_tiny_model


@pytest.mark.parametrize("enabled, device, scratch, on", [
    ("auto", "cpu", False, True), ("auto", "cuda", False, False), ("auto", "cpu", True, False),
    (True, "cuda", True, True), (False, "cpu", False, False)])
def test_auto_is_on_for_a_real_base_on_cpu(enabled, device, scratch, on):
    assert LoraConfig(enabled=enabled).on(device, scratch) is on


@pytest.mark.slow  # trains
def test_lora_sft_merges_saves_and_reloads_with_identical_logits(tmp_path):
    model, tok = load(save_random_tiny_model(tmp_path / "base"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = ift_examples(load_seeds("seeds/demo.jsonl"))[:8]
    metrics = sft_train(model, tok, examples, epochs=1, lr=5e-3, batch_size=4, max_length=128, device="cpu", seed=0,
                        lora=LoraConfig(enabled=True), micro_batch_size=2)
    assert metrics["steps"] == 2
    assert not any("lora_" in name for name, _ in model.named_modules())  # merged in place: a plain model again
    after = model.state_dict()
    assert set(after) == set(before)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])  # the adapters' update is in the weights
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # not a LoRA target

    x = tok(["What is a noun?", "Name a planet."], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        merged_logits = model(**x).logits
    save_atomically(model, tok, tmp_path / "merged")
    reloaded, _ = load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded(**x).logits, merged_logits)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_micro_batches_accumulate_to_the_batch():
    assert _batches(8, 2) == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    assert _batches(8, None) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match=r"dpo: micro_batch_size \(3\) must divide batch_size \(4\)"):
        load_config(None, ["dpo.batch_size=4", "dpo.micro_batch_size=3"])
