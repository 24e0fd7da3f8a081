"""Test set-up. The Triton interpreter must be switched on before any @triton.jit module is
imported (otherwise: "0 active drivers"), so it happens here, first. Under the interpreter
kernels run on CPU tensors in fp32/fp16; bf16 kernels are checked on a GPU (see tests marked gpu)."""

import os

if not os.environ.get("VIDSPARSE_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
