"""The README's "Python API" snippets run as written, with the demo models, on a few demo scenes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from difffeat.demo.data import make_demo_dataset
from difffeat.features.featurizer import Features

README = Path(__file__).parents[1] / "README.md"
SMALL = {"n_train": 24, "n_val": 12, "n_test": 12}  # test-only: the README's sizes, shrunk to keep this fast


def api_snippets() -> list[str]:
    """The ```python blocks of the README's "## Python API" section, in order."""
    text = README.read_text()
    match = re.search(r"^## Python API\n(.*?)^## ", text, flags=re.S | re.M)
    assert match, "README has no '## Python API' section"
    return re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)


def shrink(code: str) -> str:
    for name, size in SMALL.items():
        code = re.sub(rf"\b{name}=\d+", f"{name}={size}", code)
    return code


def test_the_shortest_image_feature_snippet_is_at_most_four_lines():
    first = api_snippets()[0]
    assert "ImageFeaturizer.from_pretrained" in first
    assert len([line for line in first.splitlines() if line.strip()]) <= 4


@pytest.fixture(scope="module")
def namespace():
    """Every snippet run in turn in one namespace, given a few demo images and their captions."""
    scenes = make_demo_dataset(n_train=4, n_val=0, n_test=0).split("train").samples
    ns = {"images": np.stack([s.image for s in scenes]), "captions": [list(s.captions) for s in scenes]}
    snippets = api_snippets()
    assert len(snippets) == 4  # image features, text features, probe, fusion
    for code in snippets:
        exec(compile(shrink(code), "README.md", "exec"), ns)
    return ns


def test_image_and_text_features_are_keyed_as_asked(namespace):
    feats, f = namespace["feats"], namespace["f"]
    assert isinstance(feats, Features) and list(feats) == [(-1, 100), (3, 100)]
    assert feats[(-1, 100)].shape == (4, f.layers()[-1].width)
    assert feats[(len(f.layers()) - 1, 100)] is feats[(-1, 100)]
    text_feats = namespace["text_feats"]
    assert list(text_feats) == [(-1, 0)] and text_feats[(-1, 0)].shape[0] == 4
    assert torch.isfinite(text_feats[(-1, 0)]).all()


def test_the_probe_and_the_fused_head_score_the_test_split(namespace):
    ns = namespace
    x, xt, y = ns["x"], ns["xt"], ns["y"]
    assert {k: len(v) for k, v in x.items()} == {"train": 24, "val": 12, "test": 12}
    assert x["test"].shape == (12, 128) and xt["test"].shape == (12, 128) and y["test"].shape == (12, 13)
    from difffeat import multilabel_metrics

    for scores in (ns["probe"].predict(x["test"]), ns["head"].predict([x["test"], xt["test"]])):
        assert scores.shape == (12, 13) and ((scores >= 0) & (scores <= 1)).all()
        assert 0.0 < multilabel_metrics(scores, y["test"])["mAP"] <= 100.0
