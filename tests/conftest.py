import sys
from pathlib import Path

import pytest

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
