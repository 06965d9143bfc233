import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from difffeat.features.extract import ImageFeatureExtractor, TextFeatureExtractor
from helpers import tiny_ddit, tiny_dit, tiny_tokenizer


@pytest.fixture(scope="module")
def image_ex():
    """An image extractor around a tiny random DiT (16 px, 3 channels, 4 blocks)."""
    return ImageFeatureExtractor(tiny_dit())


@pytest.fixture(scope="module")
def text_ex(tmp_path_factory):
    """A text extractor around a tiny random DDiT and a word tokenizer trained on ``helpers.CAPTIONS``."""
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return TextFeatureExtractor(tiny_ddit(tok.vocab_size), tok)


# ---------------------------------------------------------------- device under test (tests/test_cuda.py)

DEVICE_ENV = "DIFFFEAT_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=None,
        help=f"device the CUDA-aware tests run on and compare against the CPU: cpu (default), cuda, cuda:1, auto "
        f"(env: {DEVICE_ENV})",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (--device cuda); skipped with a reason elsewhere")


def _device_spec(config) -> str:
    """The device named by the option, else the environment, else cpu; ``auto`` resolved."""
    spec = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests run only when the device under test is a CUDA device that is really there."""
    spec = _device_spec(config)
    if spec.startswith("cuda") and torch.cuda.is_available():
        return
    why = f"needs --device cuda (or {DEVICE_ENV}=cuda)" if not spec.startswith("cuda") else "CUDA is not available"
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device under test: what ``--device``/``DIFFFEAT_TEST_DEVICE`` name (default cpu, where the CUDA-aware
    tests compare the CPU with itself so their code path runs in CI). Asking for CUDA where there is none skips."""
    spec = _device_spec(pytestconfig)
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {spec}: CUDA is not available on this machine")
    return dev
