"""The text families through the run config: RADD chosen from its folder, the family options (dtype, device_map,
allow_large) reaching only the loaders that take them, and a large model refused in one line by the CLI."""

from __future__ import annotations

import json

import pytest
from tests.models.test_radd import TINY
from typer.testing import CliRunner

from difffeat.features.options import TextModelOptions
from difffeat.models import large
from difffeat.models.radd import RADD, RADDConfig, save_radd
from difffeat.run.cli import app
from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment, family_options
from helpers import randomise, tiny_tokenizer

DEMO = ["data.kind=demo", "data.options={n_train: 4, n_val: 2, n_test: 2}", "extract.modalities=[text]",
        "extract.text_blocks=[1]", "extract.text_timesteps=[0, 300]"]  # fmt: skip


@pytest.fixture
def radd_folder(tmp_path):
    folder = save_radd(randomise(RADD(RADDConfig(**TINY))), tmp_path / "radd")
    tiny_tokenizer(folder)
    return folder


def test_family_options_reach_only_the_loaders_that_take_them() -> None:
    options = TextModelOptions(dtype="bfloat16", allow_large=True)
    assert family_options(options, "text", "radd") == {"dtype": "bfloat16", "allow_large": True}
    with pytest.raises(ValueError, match=r"text.allow_large: the ddit backbone takes no allow_large \(it is for radd"):
        family_options(options, "text", "ddit")
    gemma = family_options(TextModelOptions(device_map="cuda"), "text", "diffusion_gemma")
    assert gemma == {"dtype": "float32", "device_map": "cuda", "allow_large": False}
    with pytest.raises(ValueError, match=r"text.device_map.*'gpu' is not a device map"):
        apply_overrides(RunConfig(), ["text.device_map=gpu"])


def test_radd_folder_extracts_through_the_pipeline(radd_folder, tmp_path) -> None:
    exp = Experiment(apply_overrides(RunConfig(), [f"out={tmp_path / 'run'}", f"text.ddit={radd_folder}", *DEMO]))
    assert exp.extractor("text").backbone.family == "radd" and exp.depth("text") == TINY["n_blocks"]
    assert exp.time("text").name == "masked"


def test_large_text_model_is_one_line_from_the_cli_until_allowed(radd_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(large, "LARGE_PARAMS", 1000)
    args = ["extract", f"--set=text.ddit={radd_folder}", *(f"--set={s}" for s in DEMO)]
    refused = CliRunner().invoke(app, [*args, f"--out={tmp_path / 'refused'}"])
    assert refused.exit_code == 2 and refused.exception is not None and "Traceback" not in refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "text.allow_large: true" in errors[0], refused.output
    done = CliRunner().invoke(app, [*args, "--set=text.allow_large=true", f"--out={tmp_path / 'allowed'}"])
    assert done.exit_code == 0, done.output
    metas = [json.loads(p.read_text()) for p in (tmp_path / "allowed" / "store" / "entries").glob("*/meta.json")]
    assert len(metas) == 6  # train, val, test x steps 0, 300
    assert {(m["config"]["model"]["backbone"], m["key"]["time"]) for m in metas} == {("radd", "masked")}
