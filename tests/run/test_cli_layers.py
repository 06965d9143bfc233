"""``difffeat layers SOURCE``: the table of a model's blocks from a subprocess, and one line for a bad source."""

import subprocess
import sys

import torch

from difffeat.models.dit import DiT, DiTConfig
from helpers import randomise


def difffeat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difffeat", *args], capture_output=True, text=True, timeout=300)


def test_layers_of_a_sit_file_prints_blocks_widths_and_time_convention(tmp_path):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6, num_classes=10)
    torch.save(randomise(DiT(cfg)).state_dict(), tmp_path / "SiT-S-2.pt")
    done = difffeat("layers", str(tmp_path / "SiT-S-2.pt"), "--backbone", "sit")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "sit (image), 2 blocks"
    assert lines[1].startswith("time: sit-flow 0..1, clean = 1")
    assert lines[-2:] == ["    0  blocks.0                         384", "    1  blocks.1                         384"]


def test_a_bad_source_is_one_line_and_exit_2(tmp_path):
    for args in (["layers", str(tmp_path / "missing.pt")], ["layers", str(tmp_path)]):
        done = difffeat(*args)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
