"""The measured checks a run reports: each one can come out true, false, or undecidable."""

from types import SimpleNamespace

import numpy as np

from difffeat.run.summary import (
    CLEAR_MARGIN,
    IMAGE_MARGIN,
    _still_improving_note,
    claims,
    skipped_records,
    still_improving,
)

GRIDS = {"image": ([0, 1, 2], [0, 100, 500, 999]), "text": ([0, 1], [0, 250, 750])}


def tables(image_best=(1, 1), text_best=(1, 0)):
    image, text = np.full((3, 4), 30.0), np.full((2, 3), 40.0)
    image[image_best], text[text_best] = 50.0, 60.0
    return {"image": image, "text": text}


def search(image=50.0, text=60.0, evaluations=6):
    return {"best_scores": {"image": image, "text": text}, "num_scored_unimodal": evaluations,
            "grid_cells": {"image": 12, "text": 6, "pair": 72}}  # fmt: skip


def results(fused=70.0, image=50.0, text=60.0, pixels=40.0, random_init=45.0, random_text=50.0):
    named = {"fused": fused, "image": image, "text": text, "pixels": pixels, "random_init_image": random_init,
             "random_init_text": random_text}  # fmt: skip
    return {name: {"mAP": v} for name, v in named.items()}


def curve(image_lead_at_100=10.0, text_lead_at_100=5.0):
    """A label-efficiency curve whose leads over the baselines at 1000 labels are 5 (image) and 3 (text)."""
    return {
        "image": {"100": 30 + image_lead_at_100, "1000": 50.0},
        "pixels": {"100": 25.0, "1000": 45.0},
        "random_init_image": {"100": 30.0, "1000": 40.0},
        "text": {"100": 40 + text_lead_at_100, "1000": 60.0},
        "random_init_text": {"100": 40.0, "1000": 57.0},
    }


def test_a_working_run_passes_every_check():
    out = claims(results(), search(), tables(), GRIDS, "mAP", curve=curve())
    assert out == {
        "fused_above_every_other_row": True,
        f"image_above_pixels_by_{IMAGE_MARGIN:g}": True,
        f"image_above_random_init_image_by_{IMAGE_MARGIN:g}": True,
        f"text_above_random_init_text_by_{CLEAR_MARGIN:g}": True,
        "image_lead_grows_with_fewer_labels": True,
        "text_lead_grows_with_fewer_labels": True,
        "image_best_t_below_grid_max": True,
        "text_best_step_at_low_noise": True,
        "image_search_within_0.5_of_grid": True,
        "text_search_within_0.5_of_grid": True,
        "search_used_at_most_a_third_of_grid": True,
    }


def test_each_failure_is_reported():
    out = claims(
        results(fused=55.0, image=46.0, pixels=45.0, random_init=45.0, random_text=59.0),  # fused < text; 1 above
        search(image=49.0, text=59.0, evaluations=7),  # 1 below the grid optima; 7 > 18 / 3 evaluations
        tables(image_best=(2, 3), text_best=(0, 2)),  # image best at t = 999, text best at step 750
        GRIDS,
        "mAP",
        curve=curve(image_lead_at_100=5.0, text_lead_at_100=2.0),  # leads shrink (5 -> 5 is not growth; 3 -> 2)
    )
    assert not any(out.values()), out


def test_fused_must_beat_the_baselines_too():
    """A baseline or ablation row above the fused head fails the check, as image or text above it does."""
    out = claims(results(random_text=75.0), search(), tables(), GRIDS, "mAP")
    assert out["fused_above_every_other_row"] is False
    res = results()
    res["concat"] = {"mAP": 70.5}
    assert claims(res, search(), tables(), GRIDS, "mAP")["fused_above_every_other_row"] is False


def test_a_curve_without_two_sizes_of_every_row_is_undecided():
    partial = curve()
    partial["pixels"]["100"] = None  # fewer train rows than asked for
    partial["random_init_text"] = {"1000": 57.0}
    out = claims(results(), search(), tables(), GRIDS, "mAP", curve=partial)
    assert out["image_lead_grows_with_fewer_labels"] is None and out["text_lead_grows_with_fewer_labels"] is None
    assert claims(results(), search(), tables(), GRIDS, "mAP")["image_lead_grows_with_fewer_labels"] is None


def test_the_fused_head_cannot_carry_the_image_checks_and_missing_runs_are_undecided():
    res = results(fused=90.0, image=41.0)  # text makes the fused head strong; image features are not
    out = claims(res, search(), tables(), GRIDS, "mAP")
    assert out[f"image_above_pixels_by_{IMAGE_MARGIN:g}"] is False
    del res["pixels"]
    partial = {"image": np.where(np.eye(3, 4, dtype=bool), 50.0, np.nan)}  # search mode: only visited cells
    out = claims(res, search(), partial, GRIDS, "mAP")
    assert out[f"image_above_pixels_by_{IMAGE_MARGIN:g}"] is None
    assert "image_search_within_0.5_of_grid" not in out and out["image_best_t_below_grid_max"] is True


def test_the_noisiest_time_follows_the_convention():
    """SiT counts time the other way (t = 1 clean): its noisiest grid time is the smallest."""
    sit = {"image": ([0, 1, 2], [0.1, 0.5, 0.9, 0.99])}
    best_at_clean = {"image": tables(image_best=(1, 3))["image"]}
    assert claims(results(), search(), best_at_clean, sit, "mAP")["image_best_t_below_grid_max"] is False
    assert claims(results(), search(), best_at_clean, sit, "mAP", {"image": 0.1})["image_best_t_below_grid_max"]
    best_at_noise = {"image": tables(image_best=(1, 0))["image"]}
    assert not claims(results(), search(), best_at_noise, sit, "mAP", {"image": 0.1})["image_best_t_below_grid_max"]


def test_probes_and_heads_cut_off_while_improving_are_named(tmp_path):
    (tmp_path / "sweep_image.csv").write_text("block,t,val_score,best_epoch,seconds\n0,0,30.0,200,1\n0,50,20.0,120,1\n")
    (tmp_path / "sweep_text.csv").write_text("block,t,val_score,best_epoch,seconds\n1,0,70.0,181,1\n")
    cfg = SimpleNamespace(probe=SimpleNamespace(epochs=200), fusion=SimpleNamespace(epochs=100))
    exp = SimpleNamespace(out=tmp_path, modalities=["image", "text"], cfg=cfg)
    heads = {"fused": SimpleNamespace(best_epoch=60), "image": SimpleNamespace(best_epoch=95)}
    late = still_improving(exp, heads)
    assert late == {"probes": ["image (0, 0)", "text (1, 0)"], "heads": ["image"]}
    note = _still_improving_note(late)
    assert "2 sweep probes" in note and "heads image" in note
    assert _still_improving_note({"probes": [], "heads": []}) is None


def test_every_record_left_out_is_listed_with_its_reason():
    bad = {"train": [("s3", "sample 's3': cannot decode image img3.png")], "val": [], "test": [("t1", "not found")]}
    exp = SimpleNamespace(
        data=SimpleNamespace(skipped=[("train/13", "no instance annotation (drop_unannotated=True)")]),
        store=SimpleNamespace(skipped=lambda split: bad[split]),
    )
    assert skipped_records(exp) == [
        {"record": "train/13", "reason": "no instance annotation (drop_unannotated=True)", "left out by": "reader"},
        {"record": "s3", "reason": "sample 's3': cannot decode image img3.png", "left out by": "image check (train)"},
        {"record": "t1", "reason": "not found", "left out by": "image check (test)"},
    ]


def test_curve_table_has_one_row_per_head_and_sizes_ascending():
    from difffeat.run.summary import curve_table

    rows = curve_table({"fused": {"1000": 57.3, "100": 33.2, "300": 45.8}, "pixels": {"100": 19.1, "1000": None}})
    assert [list(r) for r in rows] == [["name", "100 labels", "300 labels", "1000 labels"]] * 2
    assert rows[0] == {"name": "fused", "100 labels": 33.2, "300 labels": 45.8, "1000 labels": 57.3}
    assert rows[1] == {"name": "pixels", "100 labels": 19.1, "300 labels": None, "1000 labels": None}
