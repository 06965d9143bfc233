"""``difffeat layers SOURCE``: the table of a model's blocks from a subprocess, and one line for a bad source."""

import subprocess
import sys

import torch
from typer.testing import CliRunner

from difffeat.models.describe import FAMILIES
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.radd import RADD, RADDConfig, save_radd
from difffeat.run.cli import app
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


def test_a_text_folder_is_sniffed_and_every_family_is_in_the_help(tmp_path):
    folder = save_radd(RADD(RADDConfig(vocab_size=65, hidden_size=32, n_heads=2, n_blocks=3)), tmp_path / "radd")
    done = CliRunner().invoke(app, ["layers", str(folder)])
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == "radd (text), 3 blocks" and lines[1].startswith("time: masked 0..1000, clean = 0")
    assert lines[-1] == "    2  blocks.2                         32"
    wrong = CliRunner().invoke(app, ["layers", str(folder), "--backbone", "gpt"])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("error: ") and len(wrong.stderr.splitlines()) == 1
    helped = " ".join(CliRunner().invoke(app, ["layers", "--help"]).stdout.split())
    assert f"family when the source does not tell: {', '.join(FAMILIES)}" in helped
