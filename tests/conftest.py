"""Session fixtures: tiny CLIP / GPT-2 / T5 models built locally and offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads and lose a lot to oversubscription on 2 cores;
# subprocesses started by tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from prefixcap.demo import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_clip(tiny_dir) -> str:
    """A random CLIPModel (32x32 images, 16-d embeddings) with its image processor and tokenizer."""
    return str(tiny_models.build_tiny_clip(tiny_dir / "clip"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dir) -> str:
    """A random 2-layer GPT-2 (width 32) with a trained byte-level BPE GPT2Tokenizer."""
    return str(tiny_models.build_tiny_gpt2(tiny_dir / "gpt2"))


@pytest.fixture(scope="session")
def tiny_t5(tiny_dir) -> str:
    """A random 2-layer T5 (width 32) with a trained Unigram T5Tokenizer."""
    return str(tiny_models.build_tiny_t5(tiny_dir / "t5"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Each test starts with one intra-op thread and cannot leak another count to the next test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
