"""The vllm backend. vLLM is CUDA-only: the real-generate test runs wherever vllm imports (a GPU machine with
`pip install -e ".[vllm]"`) and is skipped with that reason elsewhere. What runs everywhere is the error a user gets
for choosing generate.backend=vllm where vllm is not installed."""

import importlib.util

import pytest

from flywheel.backends import SamplingParams, check_backend, make_backend, release_backends
from flywheel.config import ConfigError, GenerateConfig

PROMPTS = ["What is a noun?", "List three colours.", "Explain why ice floats on water, briefly please."]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vllm is installed here, so there is no missing-package error to see")
def test_choosing_vllm_without_vllm_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        make_backend(GenerateConfig(backend="vllm"), "unused/model", "cpu")
    msg = str(e.value)
    assert msg.startswith("generate.backend=vllm needs the vllm package, which cannot be imported here")
    assert 'pip install -e ".[vllm]"' in msg and "generate.backend=transformers" in msg
    assert e.value.__suppress_context__  # a message, not an ImportError traceback chained under it
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[vllm\]"'):  # the same, before a run starts
        check_backend(GenerateConfig(backend="vllm"))
    check_backend(GenerateConfig(backend="transformers"))


def _tiny_model_for_vllm(path):
    """The tests' tiny model, but with 64-wide attention heads, a size every vLLM attention kernel supports."""
    from tests.helpers.models import save_random_tiny_model

    return str(save_random_tiny_model(path, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1))


def test_real_generate_with_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is CUDA-only; this runs on a GPU machine with .[vllm] installed")
    path = _tiny_model_for_vllm(tmp_path / "tiny")
    gen = GenerateConfig(backend="vllm", vllm={"gpu_memory_utilization": 0.3, "max_model_len": 512})
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12)
    try:
        backend = make_backend(gen, path, "cuda")
        assert backend.name == "vllm" and make_backend(gen, path, "cuda") is backend
        chat = backend.generate(PROMPTS, params, seed=5, chat=True)
        chat_again = backend.generate(PROMPTS, params, seed=5, chat=True)
        other_seed = backend.generate(PROMPTS, params, seed=6, chat=True)
        raw = backend.generate(PROMPTS, params, seed=5, chat=False)
    finally:
        release_backends()
    for out in (chat, raw):
        assert [len(o) for o in out] == [3, 3, 3]
        for g in (g for o in out for g in o):
            assert 0 <= g.num_tokens <= 12 and g.finish_reason in ("stop", "length")
            assert g.finish_reason == "stop" or g.num_tokens == 12
    assert chat == chat_again and chat != other_seed  # per-prompt seeds make a batch reproducible
    assert len({g.text for o in chat for g in o}) > 3
