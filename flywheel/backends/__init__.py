"""Models and where they run.

    generation.py   `GenerationBackend`: transformers (CPU/GPU), vLLM (GPU), any OpenAI-compatible server; make_backend
    ray_data.py     `RayBackend`: a stage's batches as a Ray Data job over an actor pool (ray imported lazily)
    models.py       the one model loader (`load`), atomic saves, the tiny model built from scratch, threads
    bases.py        `model.base` resolved: tiny, the built-in SmolLM2 GGUF, a GGUF file, a folder, a hub id
    serve.py        `flywheel serve`: an OpenAI-compatible server over local models
"""

from .generation import (
                         BackendError,
                         Generation,
                         GenerationBackend,
                         OpenAIBackend,
                         SamplingParams,
                         TransformersBackend,
                         VLLMBackend,
                         check_backend,
                         make_backend,
                         release_backends,
)
from .ray_data import RayBackend

__all__ = ["BackendError", "Generation", "GenerationBackend", "OpenAIBackend", "RayBackend", "SamplingParams",
           "TransformersBackend", "VLLMBackend", "check_backend", "make_backend", "release_backends"]
