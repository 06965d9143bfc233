"""The prepared GPU training script runs end to end (on the CPU, tiny sizes), so a borrowed GPU session only has
to run it: pool, DiT and DDiT folders that load, with a recipe that says where they ran."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from difffeat.models.ddit_load import load_ddit
from difffeat.models.dit_load import load_dit

ROOT = Path(__file__).parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train_zoo", ROOT / "benchmarks" / "gpu_train_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["gpu_train_zoo.py", *argv])
    module.main()


def test_smoke_trains_loadable_models_on_the_pool(tmp_path, monkeypatch):
    script = _script()
    cache = str(tmp_path / "pool.npz")
    _run(script, monkeypatch, "pool", "--cache", cache, "--pool", "12", "--workers", "1")
    _run(script, monkeypatch, "dit", "--cache", cache, "--out", str(tmp_path / "dit"), "--smoke")
    _run(script, monkeypatch, "ddit", "--cache", cache, "--out", str(tmp_path / "ddit"), "--smoke")
    dit, ddit = load_dit(tmp_path / "dit"), load_ddit(tmp_path / "ddit")
    assert dit.config.hidden_size == 128 and dit.config.depth == 6 and ddit.config.kind == "sedd"
    assert next(dit.parameters()).dtype.is_floating_point
    for folder in ("dit", "ddit"):
        info = json.loads((tmp_path / folder / "recipe.json").read_text())
        assert info["recipe"]["pool"] == 12 and info["device"] == "cpu" and info["steps_done"] == 2
    assert (tmp_path / "ddit" / "tokenizer.json").is_file()


def test_gpu_recipes_ask_for_the_gpu_and_bf16():
    script = _script()
    for recipe in (script.GPU_DIT, script.GPU_DDIT):
        assert recipe["device"] == "auto" and recipe["bf16"] and recipe["steps"] >= 10_000


@pytest.mark.slow
def test_shell_script_smoke(tmp_path):
    """The exact script a GPU session runs, with --smoke: pool, four trainings in parallel, summary lines."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_train_zoo.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("demo-dit-v2", "demo-ddit-v2-sedd", "demo-ddit-v2-mdlm", "demo-ddit-v2-ceall"):
        assert (tmp_path / name / "model.safetensors").is_file() and f"{name}/recipe.json" in done.stdout
