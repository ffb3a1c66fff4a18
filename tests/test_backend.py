"""The transformers backend on a small real model: shapes, seeding, finish reasons, chat formatting; make_backend's
one-slot cache and its key."""

import pytest

from flywheel.backends import SamplingParams, TransformersBackend, make_backend, release_backends
from flywheel.config import GenerateConfig
from tests.helpers.models import save_random_tiny_model

PROMPTS = ["What is a noun?", "List three colours.", "Explain why ice floats on water, briefly please."]


@pytest.fixture(scope="module")
def backend(tiny_model_path):
    return TransformersBackend(str(tiny_model_path), "cpu")


def test_n_samples_per_prompt_and_token_limits(backend):
    params = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12)
    out = backend.generate(PROMPTS, params, seed=1, chat=True)
    assert [len(o) for o in out] == [3, 3, 3]
    for gens in out:
        for g in gens:
            assert 0 <= g.num_tokens <= 12
            assert g.finish_reason in ("stop", "length")
            assert g.finish_reason == "stop" or g.num_tokens == 12  # "length" only at the limit
    assert len({g.text for gens in out for g in gens}) > 3  # sampling gives different texts


def test_same_seed_same_outputs_other_seed_other_outputs(backend):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=16)
    a = backend.generate(PROMPTS, params, seed=7, chat=True)
    b = backend.generate(PROMPTS, params, seed=7, chat=True)
    c = backend.generate(PROMPTS, params, seed=8, chat=True)
    assert a == b and a != c


def test_batched_generation_does_not_depend_on_neighbours_for_greedy(backend):
    """Left padding is right: a prompt's greedy continuation is the same alone or in a batch of longer prompts."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    alone = backend.generate(PROMPTS[:1], params, seed=0, chat=True)[0]
    batched = backend.generate(PROMPTS, params, seed=0, chat=True)[0]
    assert alone == batched


def test_chat_formatting_uses_the_template(backend):
    text = backend._format("hello", chat=True)
    assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert backend._format("hello", chat=False) == "hello"


def test_unknown_backend_is_a_clear_error():
    gen = GenerateConfig.model_construct(backend="nope")  # the config refuses it; make_backend must too
    with pytest.raises(ValueError, match="unknown generation backend 'nope'; available: transformers, vllm, openai"):
        make_backend(gen, "unused", "cpu")


def test_one_loaded_backend_is_shared_until_released(tmp_path):
    path = str(save_random_tiny_model(tmp_path / "tiny"))
    gen = GenerateConfig(backend="transformers")
    first = make_backend(gen, path, "cpu")
    assert make_backend(gen, path, "cpu") is first  # self-instruct, generate, judge: one load
    assert make_backend(GenerateConfig(backend="transformers", n=8, temperature=0.1), path, "cpu") is first  # sampling
    release_backends()  # what a training stage does before loading its own copy
    assert make_backend(gen, path, "cpu") is not first
    release_backends()


def test_backend_options_are_part_of_the_cache_key():
    a = GenerateConfig(backend="openai", openai={"base_url": "http://127.0.0.1:1/v1"})
    b = GenerateConfig(backend="openai", openai={"base_url": "http://127.0.0.1:2/v1"})
    first = make_backend(a, "models/m1", "cpu")
    assert make_backend(a.model_copy(), "models/m1", "cpu") is first
    assert make_backend(b, "models/m1", "cpu") is not first  # another server is another backend
    second = make_backend(b, "models/m1", "cpu")
    assert second.base_url == "http://127.0.0.1:2/v1"
    assert make_backend(b, "models/m2", "cpu") is not second  # another model too
    release_backends()
