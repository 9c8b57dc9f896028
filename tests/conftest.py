"""Shared fixtures: tiny SDXL-topology pipelines with random weights, built once per session and
saved as diffusers folders (diffusers + transformers are test-only dependencies)."""

import os
import sys
from pathlib import Path

import pytest
import torch

# before diffusers imports triton: test_kernels runs the Triton kernel on CPU in the interpreter
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (sdxl_testing, tokenizer_fixtures)

from sdxl_testing import tiny_pipeline  # noqa: E402

torch.set_grad_enabled(False)


# a seed per kind: the base's, the refiner's and the inpaint model's VAE and text encoders differ, so a model using
# another's component (or load(share=) sharing the wrong one) shows in the outputs
SEEDS = {"base": 0, "refiner": 10, "inpaint": 20}


def _tiny(kind, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tiny_{kind}")
    pipe = tiny_pipeline(kind, root / "tokenizers", seed=SEEDS[kind])
    pipe.save_pretrained(root / "model", safe_serialization=True)
    return pipe, root / "model"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """(diffusers pipeline, its saved diffusers folder)."""
    return _tiny("base", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_refiner(tmp_path_factory):
    return _tiny("refiner", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    return _tiny("inpaint", tmp_path_factory)
