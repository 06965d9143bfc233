"""Local search on synthetic score landscapes whose optima are known by construction."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from difffeat.search import EvalRecord, SearchOptions, cache_key, local_search

BLOCKS = list(range(28))  # DiT-XL/2 depth
STEPS = list(range(0, 1000, 50))  # 20 DDPM timesteps
TEXT_BLOCKS = list(range(12))
TEXT_STEPS = [0, 100, 200, 300, 400, 500]
IMAGE_GRID = {"image": (BLOCKS, STEPS)}
BOTH_GRIDS = {"image": (BLOCKS, STEPS), "text": (TEXT_BLOCKS, TEXT_STEPS)}


def lattice_distance(cell: tuple[int, int], centre: tuple[int, int], steps: list[int] = STEPS) -> float:
    """Euclidean distance in lattice steps, so landscapes are shaped in the space the search moves in."""
    return math.hypot(cell[0] - centre[0], steps.index(cell[1]) - steps.index(centre[1]))


class Counter:
    """Wraps a landscape and counts how often the search really calls it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def cone(centre: tuple[int, int], height: float = 1.0, slope: float = 0.2):
    return lambda cell: height - slope * lattice_distance(cell, centre)


def single(landscape):
    """Adapt a cell -> score landscape to the (modality, cell) signature."""
    return Counter(lambda modality, cell: landscape(cell))


def test_single_peak_reaches_global_max_with_few_evaluations():
    peak = (5, 200)
    evaluate = single(cone(peak))
    result = local_search(evaluate, None, IMAGE_GRID)
    assert result.best["image"] == peak
    assert result.best_scores["image"] == pytest.approx(1.0)
    assert result.path["image"][0] == (14, 500)  # default image start: middle block, middle timestep
    assert result.path["image"][-1] == peak
    assert result.num_evaluations == evaluate.calls == len(result.evaluations)
    assert result.grid_size == result.grid_size_unimodal == 28 * 20
    assert result.num_evaluations < result.grid_size / 4


def test_path_moves_one_lattice_step_at_a_time_and_scores_rise():
    landscape = cone((20, 850))
    result = local_search(single(landscape), None, IMAGE_GRID)
    path = result.path["image"]
    for a, b in itertools.pairwise(path):
        assert max(abs(a[0] - b[0]), abs(STEPS.index(a[1]) - STEPS.index(b[1]))) == 1
        assert landscape(b) > landscape(a)


def test_plateau_stops_at_start_without_looping():
    evaluate = single(lambda cell: 0.5)
    result = local_search(evaluate, None, IMAGE_GRID)
    assert result.path["image"] == [(14, 500)]
    assert result.num_evaluations == 9  # start + its 8 neighbours, then no strict improvement
    assert not result.budget_exhausted


def test_flat_topped_hill_stops_on_the_plateau_edge():
    top = (10, 300)
    evaluate = single(lambda cell: min(0.0, 3.0 - lattice_distance(cell, top)))
    result = local_search(evaluate, None, IMAGE_GRID)
    assert lattice_distance(result.best["image"], top) <= 3.0
    assert result.best_scores["image"] == 0.0
    assert result.num_evaluations < 100


def test_min_delta_rejects_small_improvements():
    evaluate = single(cone((5, 200), slope=0.01))
    result = local_search(evaluate, None, IMAGE_GRID, SearchOptions(min_delta=0.05))
    assert result.path["image"] == [(14, 500)]


TWO_PEAKS_LOW, TWO_PEAKS_HIGH = (3, 100), (22, 800)


def two_peaks(cell: tuple[int, int]) -> float:
    """A low peak (1.0) and a high peak (2.0); each start climbs to the peak of its own basin."""
    return max(cone(TWO_PEAKS_LOW, 1.0)(cell), cone(TWO_PEAKS_HIGH, 2.0)(cell))


@pytest.mark.parametrize(
    ("start", "expected"),
    [((5, 150), TWO_PEAKS_LOW), ((14, 500), TWO_PEAKS_HIGH), ((24, 900), TWO_PEAKS_HIGH)],
)
def test_two_peaks_reaches_the_optimum_of_the_start_basin(start, expected):
    result = local_search(single(two_peaks), None, IMAGE_GRID, SearchOptions(image_start=list(start)))
    assert result.best["image"] == expected
    assert result.path["image"][0] == start


def test_budget_exhaustion_stops_at_the_best_evaluated_cell():
    evaluate = single(cone((5, 200)))
    result = local_search(evaluate, None, IMAGE_GRID, options=SearchOptions(budget=5))
    assert result.num_evaluations == evaluate.calls == 5
    assert result.budget_exhausted
    assert result.best_scores["image"] == max(record.score for record in result.evaluations)


def test_zero_budget_without_cache_evaluates_nothing():
    result = local_search(single(cone((5, 200))), None, BOTH_GRIDS, options=SearchOptions(budget=0))
    assert result.best == {} and result.evaluations == [] and result.best_pair is None
    assert result.budget_exhausted


def test_cache_reuse_makes_no_new_evaluations_and_survives_json():
    peak = (5, 200)
    cache: dict = {}
    first = local_search(single(cone(peak)), None, IMAGE_GRID, cache=cache)
    restored = json.loads(json.dumps(cache))  # what a resumed pipeline reads back from disk
    evaluate = single(cone(peak))
    second = local_search(evaluate, None, IMAGE_GRID, cache=restored, options=SearchOptions(budget=0))
    assert evaluate.calls == 0 and second.num_evaluations == 0
    assert second.num_cached == len(first.evaluations)
    assert all(record.cached and record.seconds == 0.0 for record in second.evaluations)
    assert second.best == first.best and second.path == first.path
    assert second.num_scored_in("unimodal") == first.num_scored_in("unimodal") == first.num_evaluations > 0
    assert cache[cache_key("image", peak)]["score"] == pytest.approx(1.0)


def test_cache_lets_an_interrupted_search_resume():
    peak = (5, 200)
    cache: dict = {}
    partial = local_search(single(cone(peak)), None, IMAGE_GRID, cache=cache, options=SearchOptions(budget=10))
    assert partial.budget_exhausted and partial.best["image"] != peak
    resumed = local_search(single(cone(peak)), None, IMAGE_GRID, cache=cache)
    full = local_search(single(cone(peak)), None, IMAGE_GRID)
    assert resumed.best["image"] == peak
    assert resumed.num_evaluations == full.num_evaluations - partial.num_evaluations


def test_records_are_logged_in_order_and_each_cell_once():
    logged: list[EvalRecord] = []
    result = local_search(single(cone((5, 200))), None, IMAGE_GRID, log=logged.append)
    assert logged == result.evaluations
    assert logged[0].key == (14, 500) and logged[0].stage == "unimodal" and logged[0].modality == "image"
    keys = [record.key for record in logged]
    assert len(keys) == len(set(keys))
    assert "image" in str(logged[0])


def test_nan_scores_are_never_chosen():
    landscape = cone((5, 200))
    bad = {(13, 450), (13, 500), (13, 550)}  # the cells on the way to the peak fail
    cache: dict = {}
    result = local_search(single(lambda c: math.nan if c in bad else landscape(c)), None, IMAGE_GRID, cache=cache)
    assert result.best["image"] == (5, 200)
    assert not set(result.path["image"]) & bad
    restored = json.loads(json.dumps(cache, allow_nan=False))  # failed cells are stored as null: strict JSON
    again = local_search(single(landscape), None, IMAGE_GRID, cache=restored)
    assert again.num_evaluations == 0 and again.path == result.path


def pair_landscape(image_optimum, text_optimum, fused_image, fused_text):
    """Unimodal peaks at one place, fused peak offset from them (features complement each other elsewhere)."""

    def evaluate_single(modality, cell):
        if modality == "image":
            return cone(image_optimum)(cell)
        return 1.0 - 0.2 * lattice_distance(cell, text_optimum, TEXT_STEPS)

    def evaluate_pair(image_cell, text_cell):
        return 3.0 - 0.1 * (
            lattice_distance(image_cell, fused_image) + lattice_distance(text_cell, fused_text, TEXT_STEPS)
        )

    return Counter(evaluate_single), Counter(evaluate_pair)


def test_pair_stage_improves_over_the_pair_of_unimodal_optima():
    fused_image, fused_text = (9, 350), (9, 200)
    evaluate_single, evaluate_pair = pair_landscape((12, 450), (11, 0), fused_image, fused_text)
    result = local_search(evaluate_single, evaluate_pair, BOTH_GRIDS)
    assert result.best == {"image": (12, 450), "text": (11, 0)}
    assert result.pair_path[0] == ((12, 450), (11, 0))
    assert result.best_pair == (fused_image, fused_text)
    assert result.pair_score == pytest.approx(3.0)
    assert result.pair_score > evaluate_pair.fn((12, 450), (11, 0))
    for a, b in itertools.pairwise(result.pair_path):
        assert (a[0] == b[0]) != (a[1] == b[1]), "exactly one modality moves per step"
    assert {a[0] != b[0] for a, b in itertools.pairwise(result.pair_path)} == {True, False}
    assert result.num_evaluations_in("pair") == evaluate_pair.calls
    assert result.grid_size_pair == 28 * 20 * 12 * 6
    assert result.grid_size == 28 * 20 + 12 * 6 + 28 * 20 * 12 * 6
    assert result.num_evaluations < 0.01 * result.grid_size


def test_default_text_start_is_deepest_block_clean_input():
    evaluate_single, evaluate_pair = pair_landscape((12, 450), (11, 0), (12, 450), (11, 0))
    result = local_search(evaluate_single, evaluate_pair, BOTH_GRIDS)
    assert result.path["text"][0] == (11, 0)
    assert result.pair_path == [((12, 450), (11, 0))]


def test_single_modality_skips_the_pair_stage():
    evaluate_pair = Counter(lambda image, text: 0.0)
    result = local_search(single(cone((5, 200))), evaluate_pair, IMAGE_GRID)
    assert evaluate_pair.calls == 0 and result.best_pair is None and result.pair_score is None
    assert result.grid_size_pair == 0 and "pair" not in result.grid_cells


def test_radius_two_uses_the_wider_neighbourhood():
    result = local_search(single(lambda cell: 0.0), None, IMAGE_GRID, SearchOptions(radius=2))
    assert result.num_evaluations == 25


def test_to_dict_is_json_serialisable():
    evaluate_single, evaluate_pair = pair_landscape((12, 450), (11, 0), (9, 350), (9, 200))
    result = local_search(evaluate_single, evaluate_pair, BOTH_GRIDS, options=SearchOptions(budget=40))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["num_evaluations"] == result.num_evaluations <= 40
    assert data["num_evaluations_unimodal"] + data["num_evaluations_pair"] == data["num_evaluations"]
    assert data["best"]["image"] == list(result.best["image"])
    assert data["grid_size"] == data["grid_size_unimodal"] + data["grid_size_pair"]
    assert data["evaluations"][0]["key"] == [14, 500]


@pytest.mark.parametrize(
    ("grids", "starts", "message"),
    [
        ({"image": (BLOCKS, [500, 0])}, None, "strictly increasing"),
        ({"audio": (BLOCKS, STEPS)}, None, "grids must name"),
        (IMAGE_GRID, {"image_start": [14, 501]}, "not on the grid"),
        (IMAGE_GRID, {"text_start": [11, 0]}, "without a grid"),
    ],
)
def test_invalid_inputs_are_rejected(grids, starts, message):
    with pytest.raises(ValueError, match=message):
        local_search(single(lambda cell: 0.0), None, grids, SearchOptions(**(starts or {})))


@pytest.mark.parametrize("peak", [(5, 200), (27, 0), (20, 850), (14, 500)])
def test_first_improvement_reaches_the_same_peak_as_steepest_ascent_with_fewer_evaluations(peak):
    first, best = single(cone(peak)), single(cone(peak))
    a = local_search(first, None, IMAGE_GRID, SearchOptions(strategy="first"))
    b = local_search(best, None, IMAGE_GRID, SearchOptions(strategy="best"))
    assert a.best["image"] == b.best["image"] == peak
    assert first.calls <= best.calls
    if peak != (14, 500):  # a walk: about one evaluation per step, plus the final neighbourhood
        assert first.calls < best.calls
        assert first.calls <= len(a.path["image"]) + 8 + 2 * 3


@pytest.mark.parametrize("strategy", ["first", "best"])
def test_the_final_cell_is_a_local_optimum_with_every_neighbour_scored(strategy):
    landscape = lambda cell: math.sin(cell[0] / 3.0) + math.cos(STEPS.index(cell[1]) / 2.0)  # noqa: E731
    result = local_search(single(landscape), None, IMAGE_GRID, SearchOptions(strategy=strategy))
    end = result.best["image"]
    bi, ti = end[0], STEPS.index(end[1])
    neighbours = [(bi + db, STEPS[ti + dt]) for db in (-1, 0, 1) for dt in (-1, 0, 1)
                  if (db, dt) != (0, 0) and 0 <= bi + db < 28 and 0 <= ti + dt < 20]  # fmt: skip
    scored = {tuple(r.key) for r in result.evaluations}
    assert set(neighbours) <= scored
    assert all(landscape(n) <= landscape(end) for n in neighbours)


def test_first_improvement_tries_the_continuing_step_then_axes_then_diagonals():
    calls = []

    def record(modality, cell):
        calls.append(cell)
        return -lattice_distance(cell, (10, 400))  # peak straight up the block axis from the start

    local_search(record, None, IMAGE_GRID, SearchOptions(image_start=[14, 400], strategy="first"))
    # from (14, 400): axis steps before diagonals, so (13, 400) is the 2nd or 3rd call; then momentum: one call
    # per step (12, 400), (11, 400), (10, 400), then the peak's neighbourhood
    assert calls[0] == (14, 400) and (13, 400) in calls[1:3]
    i = calls.index((13, 400))
    assert calls[i + 1 : i + 4] == [(12, 400), (11, 400), (10, 400)]
    assert len(calls) == i + 4 + 7  # the peak's 8 neighbours less the one it came from


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy"):
        SearchOptions(strategy="random")


def test_search_on_a_real_probe_sweep_reaches_the_grid_optimum_with_part_of_the_grid():
    """Probe scores from real fits on features whose signal fades with lattice distance from one cell."""
    import numpy as np

    from difffeat.heads.probe import ProbeOptions, run_sweep

    blocks, steps, peak = [0, 1, 2, 3, 4], [0, 100, 200, 400, 700], (3, 100)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4))
    x = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in (("train", 600), ("val", 300))}
    y = {s: (x[s] @ w > 0.5).astype(np.float32) for s in x}

    def features(block: int, t: int, split: str) -> np.ndarray:
        fade = 0.6 ** lattice_distance((block, t), peak, steps)
        noise = np.random.default_rng([block, t, split == "val"]).normal(size=x[split].shape)
        return (fade * x[split] + (1 - fade) * 2.0 * noise).astype(np.float32)

    cfg = ProbeOptions(epochs=30, patience=10, batch_size=256, lr=1e-2, num_threads=1)
    sweep = run_sweep(features, blocks, steps, y["train"], y["val"], cfg, progress=False)
    table = {(b, t): sweep.scores[i, j] for i, b in enumerate(blocks) for j, t in enumerate(steps)}
    result = local_search(lambda m, cell: table[cell], None, {"image": (blocks, steps)})
    assert result.best_scores["image"] >= np.nanmax(sweep.scores) - 0.5
    assert result.num_scored_in("unimodal") <= len(table) / 2
