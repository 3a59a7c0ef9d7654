"""Shared fixtures: a tiny random HAT model and a small synthetic dataset written to disk."""

import os

import pytest
import torch

# Nothing in the test-suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Tests compare encodings with the model's own outputs exactly: fp32, whatever the CPU. The bf16
# path that "auto" picks on AMX CPUs has tests of its own (tests/test_encoder.py).
os.environ.setdefault("HAT_ENCODE_PRECISION", "fp32")


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    from hat.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    json_path = write_synthetic_dataset(root, {"train": 48, "val": 16, "test": 16}, seed=0)
    return json_path, root / "images"


@pytest.fixture()
def one_thread():
    """One PyTorch thread, as a server's model calls run: only there does image → text scoring
    take the fused kernel of hat.native."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def tiny_model():
    from hat import create_model

    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    return model.eval(), tokenizer
