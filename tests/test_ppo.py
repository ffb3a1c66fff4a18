"""PPO with the coherent reward (SRPPO) on real tiny models: GAE by hand, the reward rising under a bounded KL, and the
PPO stage registering M_{t+1} on a real registry.

PT is a random tiny Llama; SFT is a copy trained for a few epochs on the shipped seeds' answers, so the coherent reward
log p_SFT - log p_PT pays for seed-like text. The policy starts as the SFT model, which is also the KL reference.
"""

import json

import pytest
import torch

from flywheel.backends.models import load, save_atomically
from flywheel.config import PPOConfig, load_config
from flywheel.registry import Registry, now
from flywheel.signals import coherent_rewards
from flywheel.stage import IterationState, StageContext
from flywheel.stages.bootstrap import import_seeds
from flywheel.stages.seeds import load_seeds
from flywheel.training.loops import sft_train
from flywheel.training.ppo import _gae, ppo_train, train_ppo
from tests.helpers.models import save_random_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # real SFT and PPO steps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo-models")
    save_random_tiny_model(root / "pt")
    sft, tok = load(root / "pt")
    sft_train(sft, tok, [{"prompt": s.instruction, "completion": s.response} for s in load_seeds("seeds/demo.jsonl")],
              epochs=3, lr=3e-3, batch_size=8, max_length=256, device="cpu", seed=0)
    save_atomically(sft, tok, root / "sft")
    return root / "pt", root / "sft"


def test_gae_by_hand():
    # one prompt token (masked), three response tokens, one pad; the score 1.0 sits on the last response token
    rewards = torch.tensor([[0.0, -0.1, 0.0, 1.0, 0.0]])
    values = torch.tensor([[7.0, 0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = _gae(rewards, values, mask, gamma=1.0, lam=1.0)  # Monte Carlo: return-to-go minus value
    assert adv[0].tolist() == pytest.approx([0.0, 0.9 - 0.5, 1.0 - 0.4, 1.0 - 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.9, 1.0, 1.0, 0.0])
    adv, _ = _gae(rewards, values, mask, gamma=0.9, lam=0.0)  # one-step TD errors
    assert adv[0].tolist() == pytest.approx([0.0, -0.1 + 0.9 * 0.4 - 0.5, 0.9 * 0.3 - 0.4, 1.0 - 0.3, 0.0])


def test_ppo_raises_the_coherent_reward_with_bounded_kl(models):
    pt_path, sft_path = models
    pt, tok = load(pt_path)
    sft, _ = load(sft_path)
    policy, _ = load(sft_path)
    prompts = [s.instruction for s in load_seeds("seeds/demo.jsonl")]

    def reward_fn(p, r):
        return [x["value"] for x in coherent_rewards(sft, pt, tok, p, r, batch_size=16, normalize=False, device="cpu")]

    cfg = PPOConfig(steps=30, rollout_batch_size=16, minibatch_size=8, ppo_epochs=2, learning_rate=1e-3, kl_coef=0.3,
                    max_new_tokens=24, temperature=0.7)
    before = {k: v.clone() for k, v in sft.state_dict().items()}
    out = ppo_train(policy, sft, tok, prompts, reward_fn, cfg, device="cpu", seed=0, progress=False)
    hist = out["history"]
    rewards, kls = [h["reward"] for h in hist], [h["kl"] for h in hist]
    k = 5
    start, end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"\nPPO coherent reward (mean of {cfg.rollout_batch_size} fresh samples per step):")
    print("  reward:", " ".join(f"{r:.1f}" for r in rewards))
    print("  kl:    ", " ".join(f"{x:.2f}" for x in kls))
    print(f"  start (first {k}) {start:.2f} -> end (last {k}) {end:.2f}; KL max {max(kls):.2f}, "
          f"last {k} mean {sum(kls[-k:]) / k:.2f}")
    assert len(hist) == out["steps"] == 30 and kls[0] == pytest.approx(0.0, abs=1e-4)  # starts at the reference
    assert end > start + 2.0
    assert max(kls) < 10.0 and sum(kls[-k:]) / k < 8.0
    assert all(torch.equal(v, sft.state_dict()[n]) for n, v in before.items())  # the reference stays frozen
    assert next(policy.parameters()).dtype == torch.float32


def test_ppo_stage_registers_the_next_model(tmp_path, models):
    pt_path, sft_path = models
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(open("seeds/demo.jsonl", encoding="utf-8").read().splitlines()[:6]) + "\n")
    cfg = load_config(None, [f"registry.root={tmp_path / 'reg'}", f"seeds.path={seeds}", "run.device=cpu",
                             "train.trainer=ppo", "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=2",
                             "ppo.max_new_tokens=8", "ppo.learning_rate=1e-3", "reward.coherent=true"])
    prompts_sid = import_seeds(cfg, "run").stage_run_id
    with Registry(cfg.registry.root) as reg:
        for mid, name, path in (("m-sft", "M1", sft_path), ("m-pt", "PT", pt_path)):
            reg.register_model(model_id=mid, run_id="run", name=name, kind="sft", iteration=0, parent_id=None,
                               path=str(path), stage_run_id="test", config_hash="h", created_at=now())

    result = train_ppo(StageContext(cfg, "run", 1), IterationState(model="m-sft", prompts=prompts_sid, m1="m-sft", pt="m-pt"))
    assert not result.skipped and result.stats["prompts"] == 6 and result.stats["steps"] == 2
    with Registry(cfg.registry.root) as reg:
        row = reg.model(result.stage_run_id)
    assert (row["name"], row["kind"], row["iteration"], row["parent_id"], row["ref_model_id"]) == (
        "M2", "ppo", 1, "m-sft", "m-sft")
    assert json.loads(row["train_config"])["steps"] == 2
    assert len(json.loads(row["metrics"])["history"]) == 2
    trained, _ = load(row["path"])
    sft, _ = load(sft_path)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), sft.state_dict().values()))
    assert train_ppo(StageContext(cfg, "run", 1), IterationState(model="m-sft", prompts=prompts_sid, m1="m-sft", pt="m-pt")).skipped
