"""benchmarks/gpu.py, the prepared GPU session, stays runnable: its ``--smoke`` run on the CPU, its parsers, and
its guard that one failing or overrunning section does not take the others down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu  # noqa: E402  (benchmarks/ is no package)


@pytest.mark.slow
def test_smoke_run_fills_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == list(gpu.SECTIONS)
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(gpu.SECTIONS, "ok"), done.stdout[-3000:]
    assert sections["tests"]["passed"] >= 1 and sections["tests"]["failed"] == 0
    dit = sections["dit"]
    for depth, flops in dit["gflop_per_image"].items():  # the analytic count MFU uses = torch's own counter
        assert flops["analytic"] == pytest.approx(flops["counted"], rel=1e-6), depth
    measured = {(r["blocks_run"], r["precision"], r["path"]) for r in dit["rows"]}
    wanted = {(d, "bf16", path) for d in gpu.SMOKE.depths for path in ("forward", "extractor")}
    assert wanted | {(d, "tf32", "forward") for d in gpu.SMOKE.depths} <= measured
    assert all(r["images_per_s"] > 0 and r["mfu_vs_bf16_peak"] > 0 for r in dit["rows"])
    profile = sections["profile"]
    assert {r["layer"] for r in profile["gemm"]} == {"qkv", "proj", "fc1", "fc2", "adaLN"}
    assert all(r["tflops"] > 0 for r in profile["gemm"])
    assert any(r["backend"] == "default" and r["ms"] > 0 for r in profile["sdpa"])
    kernels = profile["kernels"]
    assert kernels["top"] and sum(kernels["share_by_kind"].values()) == pytest.approx(1, abs=0.01)
    assert kernels["share_by_kind"].get("gemm", 0) > 0  # aten::addmm / linear on the CPU
    assert {r["precision"] for r in profile["ablation"]} == {"bf16-autocast", "bf16-weights"}
    assert (tmp_path / "profile.txt").exists()
    assert {r["mode"] for r in sections["compile"]["rows"]} == {"compile"}
    assert {r["setting"] for r in sections["vae"]["rows"]} == {"fp32-default", "bf16-autocast", "bf16-weights"}
    assert sections["input"]["rows"][0]["images"] == gpu.SMOKE.jpegs
    assert sections["input"]["per_image_ms"]["decode"] > 0
    e2e = sections["e2e"]
    assert {"dit_grid_bf16", "vae_fp32", "vae_bf16"} <= set(e2e["stage_images_per_s"])
    assert e2e["slowest_stage"] in e2e["stage_images_per_s"] and e2e["fraction_of_dit_alone"] > 0
    assert e2e["startup_parts_seconds"]["load_models"] >= 0
    assert all(r["captions_per_s"] > 0 for r in sections["ddit"]["rows"])
    errors = sections["tests"]["measured_errors"]  # the smoke selection's one comparison, as the GPU run records
    assert errors["count"] >= 1 and all(r["error"] <= r["tolerance"] for r in errors["all"])
    assert (tmp_path / "pytest.log").exists() and (tmp_path / "e2e.log").exists()


def test_progress_bar_times_are_read_from_the_extract_log():
    stderr = ("latents train:   0%|          | 0/4 [00:00<?, ?shard/s]\r"
              "latents train: 100%|##########| 4/4 [01:12<00:00,  3.10s/shard]\n"
              "image train: 100%|##########| 4/4 [1:00:05<00:00, 900s/shard]\n")  # fmt: skip
    assert gpu.bar_seconds(stderr) == {"latents": 72, "image": 3605}


def test_junit_failures_are_summarised(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
        '<failure message="boom">trace</failure></testcase><testcase classname="t" name="c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu.junit_summary(xml)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == [{"test": "t::b", "message": "boom"}]


def test_latent_stage_bounds_the_sequential_pipeline():
    # latents at 100/s (decode 300/s overlapped with the VAE), then features at 100/s: 50 images/s overall
    assert gpu.sequential_bound({"dit_grid_bf16": 100.0, "vae_fp32": 100.0, "decode_crop": 300.0}) == 50.0


def test_a_failing_or_overrunning_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def overrun(ctx):
        ctx.record(rows=[{"kept": 1}])
        time.sleep(60)

    monkeypatch.setitem(gpu.SECTIONS, "dit", lambda ctx: 1 / 0)
    monkeypatch.setitem(gpu.SECTIONS, "input", overrun)
    monkeypatch.setitem(gpu.SECTIONS, "vae", lambda ctx: ctx.record(fine=True))
    sizes = replace(gpu.SMOKE, boxes={**gpu.SMOKE.boxes, "input": 2})
    run = lambda name: gpu.run_child(name, sizes, torch.device("cpu"), tmp_path, tmp_path, True, {}, 30)  # noqa: E731
    (failed, _), (slow, _), (ok, _) = run("dit"), run("input"), run("vae")
    assert failed["status"] == "error" and "ZeroDivisionError" in failed["error"]
    assert slow["status"] == "error" and "timed out" in slow["error"] and slow["rows"] == [{"kept": 1}]
    assert (tmp_path / "parts" / "input.json").exists()  # in OUT: a run killed from outside brings its rows back
    assert slow["seconds"] < 30
    assert ok == {"fine": True, "status": "ok", "seconds": ok["seconds"]}


@pytest.mark.slow
def test_the_shell_wrapper_runs_gpu_py_under_its_deadline(tmp_path):
    """benchmarks/gpu.sh, what the device machine runs: its install step skipped (DIFFFEAT_NO_INSTALL), its
    deadline and arguments passed on to gpu.py, results where it says."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFFEAT_NO_INSTALL": "1"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path), "--smoke", "--sections", "ddit"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items() if s["status"] != "skipped"} == {"ddit": "ok"}
    assert (tmp_path / "gpu.log").exists()
