"""Two processes under torchrun (gloo, CPU) fill the same store a single process would, byte for byte."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import save_tiny_models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, models, out: Path, **extra) -> Path:
    dit, ddit = models
    cfg = {
        "out": str(out),
        "data": {"kind": "demo", "options": {"n_train": 40, "n_val": 10, "n_test": 10}, "splits": ["train", "val"]},
        "image": {"dit": str(dit), "name": "tiny"},
        "text": {"ddit": str(ddit), "name": "tinytext"},
        "extract": {"image_blocks": [0, 3], "image_timesteps": [10, 300], "text_blocks": [-1],
                    "text_timesteps": [0, 500], "batch_size": 4, "shard_size": 8},
        **extra,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def difffeat(*args: str, nproc: int = 1) -> None:
    """``python -m difffeat.run.cli ARGS``, or the same under ``torchrun --nproc_per_node N``; one thread each."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "difffeat.run.cli", *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def entries(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "store" / "entries").glob("*/features.npy"))}


@pytest.mark.slow
def test_two_ranks_write_the_single_process_store(tmp_path):
    models = save_tiny_models(tmp_path / "models")
    difffeat("extract", str(write_config(tmp_path / "one.yaml", models, tmp_path / "one")))
    difffeat("extract", str(write_config(tmp_path / "two.yaml", models, tmp_path / "two")), nproc=2)
    one, two = entries(tmp_path / "one"), entries(tmp_path / "two")
    assert len(one) == 2 * (1 + 2 * 2 + 1 * 2)  # per split: latents, image blocks x t, text blocks x steps
    assert two == one
    manifests = [json.loads((tmp_path / o / "store" / "manifest.json").read_text()) for o in ("one", "two")]
    assert manifests[0]["entries"].keys() == manifests[1]["entries"].keys()
    assert manifests[1]["splits"] == {"train": 40, "val": 10}
    assert not list((tmp_path / "two" / "store").rglob("shard-*.npy"))


@pytest.mark.slow
def test_a_whole_run_under_torchrun_matches_a_single_process(tmp_path):
    """Grid extraction on both ranks; sweep, search, fusion and the report on rank 0 over the merged store."""
    models = save_tiny_models(tmp_path / "models")
    small = {
        "search": {"mode": "grid", "image_grid_blocks": [0, 3], "image_grid_timesteps": [10, 300],
                   "text_grid_blocks": [-1], "text_grid_timesteps": [0, 500]},
        "probe": {"epochs": 5, "patience": 2},
        "fusion": {"epochs": 5, "search_epochs": 5, "width": 32, "search_width": 16, "ablations": [], "baselines": []},
        "report": {"tsne_samples": 30, "tsne_classes": 3},
    }  # fmt: skip
    difffeat("run", str(write_config(tmp_path / "one.yaml", models, tmp_path / "one", **small)))
    difffeat("run", str(write_config(tmp_path / "two.yaml", models, tmp_path / "two", **small)), nproc=2)
    assert entries(tmp_path / "two") == entries(tmp_path / "one")
    assert (tmp_path / "two" / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()
    for name in ("sweep_image.csv", "sweep_text.csv"):  # all but the seconds column
        scores = [[r.rsplit(",", 1)[0] for r in (tmp_path / o / name).read_text().splitlines()] for o in ("one", "two")]
        assert scores[0] == scores[1], name
    found = [json.loads((tmp_path / o / "search.json").read_text()) for o in ("one", "two")]
    assert [(f["best"], f["best_pair"]) for f in found[1:]] == [(found[0]["best"], found[0]["best_pair"])]
    assert (tmp_path / "two" / "report.html").exists()
