"""Heuristic local search for the feature layer: which (block, timestep) per modality, and which image×text pair.

Evaluating one candidate means extracting features and fitting a probe, so the full grid (every block × every
timestep, and every image cell × every text cell for the fused head) is far too expensive. The search instead
walks the grid from a sensible start and only evaluates cells next to where it stands:

1. Each modality gets its own lattice: the sorted block indices on one axis and the sorted timesteps on the other.
   The search starts at a default cell taken from the paper's findings (image: the middle block at a middle
   timestep; text: the deepest block with no noise) unless the caller gives a start.
2. Its neighbours are the cells one step away along the block axis, the timestep axis, or both (diagonals;
   ``radius`` widens the step). With ``strategy="first"`` (default) it tries them in order, the cell that
   continues its last move first, then axis steps, then diagonals, and moves to the first one that beats the
   current cell by more than ``min_delta``; a walk along a slope thus costs about one evaluation per step. With
   ``strategy="best"`` it scores every neighbour and moves to the best (steepest ascent).
3. It repeats from the new cell until no neighbour is better, which is a local optimum under either strategy
   (every neighbour of the final cell has been scored). Ties never count as an improvement, so the search
   cannot wander forever on a flat plateau.
4. The fused stage starts from the pair of unimodal optima and scores the fused model of image and text cells.
   It moves one modality at a time: first the image cell moves to its neighbours while the text cell stays fixed,
   then the text cell moves while the image cell stays fixed, swapping which modality moves after every turn.
5. The fused stage stops when neither modality can move to a strictly better pair.
6. A budget caps the number of new evaluations. When it is spent, the search keeps going only through cells whose
   scores are already known and returns the best cell it has reached.
7. Every score is stored in a memo cache, a JSON-serialisable dict the caller may keep on disk, so a resumed or
   repeated search re-uses earlier results for free.

The module knows nothing about models or feature stores: it only calls the two evaluation functions it is given.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from difffeat.utils.options import Options, option
from difffeat.utils.times import as_time

Cell = tuple[int, int | float]  # (block, time in the backbone's convention)
PairKey = tuple[Cell, Cell]
MODALITIES = ("image", "text")
STRATEGIES = ("first", "best")


def _cell(value: list[int | float]) -> str | None:
    if len(value) != 2 or not float(value[0]).is_integer():
        return f"{value!r} is not a cell; give [block, t] (an integer block, a time in the model's convention)"
    return None


@dataclass
class SearchOptions(Options):
    """How the (block, t) of each modality and the fused pair are chosen: what :func:`local_search` takes and what
    the run config's ``search:`` section holds. Blocks are 0-based; a negative start block counts from the end."""

    mode: str = option(
        "search",
        choices=("search", "grid"),
        help="search: local search, probes on demand; grid: full sweep, then the search on its table",
    )
    image_grid_blocks: list[int] = option(default_factory=list, help="lattice blocks; empty: all of the model's")
    image_grid_timesteps: list[int | float] = option(
        default_factory=list, min=0, help="lattice times in the backbone's convention; empty: its default grid"
    )
    text_grid_blocks: list[int] = option(default_factory=list, help="lattice blocks; empty: all of the model's")
    text_grid_timesteps: list[int | float] = option(
        default_factory=list, min=0, help="lattice noise steps in the backbone's convention; empty: its default grid"
    )
    image_start: list[int | float] | None = option(None, check=_cell, help="[block, t]; none: middle block, middle t")
    text_start: list[int | float] | None = option(None, check=_cell, help="[block, t]; none: deepest block, t = 0")
    budget: int | None = option(None, min=0, help="most new evaluations; none: unlimited")
    radius: int = option(1, min=1, help="neighbourhood half-width in lattice steps")
    strategy: str = option(
        "first", choices=STRATEGIES, help="first: first improving neighbour (momentum first); best: steepest ascent"
    )
    min_delta: float = option(0.0, min=0, help="a move must beat the current score by more than this")


@dataclass(frozen=True)
class EvalRecord:
    """One score the search asked for, in the order it asked.

    ``stage`` is "unimodal" or "pair"; ``modality`` is "image", "text" or "pair"; ``key`` is a (block, t) cell or,
    for the pair stage, (image cell, text cell). ``seconds`` is the time spent in *this* run (0 when cached).
    """

    stage: str
    modality: str
    key: Cell | PairKey
    score: float
    seconds: float
    cached: bool

    def __str__(self) -> str:
        source = "cached" if self.cached else f"{self.seconds:.1f}s"
        return f"[search] {self.stage:<8} {self.modality:<5} {self.key} -> {self.score:.4f} ({source})"

    def to_dict(self) -> dict:
        record = asdict(self)
        record["key"] = _as_lists(self.key)
        return record


@dataclass
class SearchResult:
    """Outcome of :func:`local_search`.

    ``best``/``best_scores`` hold each modality's unimodal optimum; a modality is missing only if the budget did not
    allow even its start to be evaluated. ``best_pair``/``pair_score`` are None without a pair stage.
    ``grid_cells`` counts the cells of the full grids ("image", "text", and "pair" = their product) so the report
    can compare the evaluations made with what an exhaustive sweep would cost.
    """

    best: dict[str, Cell]
    best_scores: dict[str, float]
    best_pair: PairKey | None
    pair_score: float | None
    evaluations: list[EvalRecord]
    path: dict[str, list[Cell]]
    pair_path: list[PairKey]
    grid_cells: dict[str, int]
    budget: int | None = None
    budget_exhausted: bool = False

    @property
    def num_evaluations(self) -> int:
        """New (uncached) evaluations made by this run: what the budget counts."""
        return sum(not record.cached for record in self.evaluations)

    @property
    def num_cached(self) -> int:
        return sum(record.cached for record in self.evaluations)

    def num_evaluations_in(self, stage: str) -> int:
        return sum(not record.cached and record.stage == stage for record in self.evaluations)

    def num_scored_in(self, stage: str) -> int:
        """Cells (or pairs) the search scored in ``stage``, cached or not: the search's cost, whoever paid it, so
        a rerun over a warm cache reports the same cost as the first run."""
        return sum(record.stage == stage for record in self.evaluations)

    @property
    def grid_size_unimodal(self) -> int:
        return sum(count for name, count in self.grid_cells.items() if name != "pair")

    @property
    def grid_size_pair(self) -> int:
        return self.grid_cells.get("pair", 0)

    @property
    def grid_size(self) -> int:
        """Cells an exhaustive search would evaluate: every unimodal cell plus every image×text pair."""
        return self.grid_size_unimodal + self.grid_size_pair

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (cells become [block, t] lists)."""
        return {
            "best": {name: list(cell) for name, cell in self.best.items()},
            "best_scores": dict(self.best_scores),
            "best_pair": _as_lists(self.best_pair) if self.best_pair is not None else None,
            "pair_score": self.pair_score,
            "num_evaluations": self.num_evaluations,
            "num_evaluations_unimodal": self.num_evaluations_in("unimodal"),
            "num_evaluations_pair": self.num_evaluations_in("pair"),
            "num_cached": self.num_cached,
            "num_scored_unimodal": self.num_scored_in("unimodal"),
            "num_scored_pair": self.num_scored_in("pair"),
            "grid_size": self.grid_size,
            "grid_size_unimodal": self.grid_size_unimodal,
            "grid_size_pair": self.grid_size_pair,
            "grid_cells": dict(self.grid_cells),
            "budget": self.budget,
            "budget_exhausted": self.budget_exhausted,
            "path": {name: _as_lists(cells) for name, cells in self.path.items()},
            "pair_path": _as_lists(self.pair_path),
            "evaluations": [record.to_dict() for record in self.evaluations],
        }


def _as_lists(value: object) -> object:
    """Nested tuples -> nested lists, the shape JSON gives back."""
    if isinstance(value, (tuple, list)):
        return [_as_lists(item) for item in value]
    return value


def _rank(score: float) -> float:
    """Comparison value of a score: NaN (a failed probe) ranks below everything instead of poisoning comparisons."""
    return -math.inf if math.isnan(score) else score


def cache_key(modality: str, key: Cell | PairKey) -> str:
    """String key of the memo cache, e.g. "image|11|500" or "pair|11|500|11|0" (JSON objects need str keys)."""
    flat = [str(v) for v in _flatten(key)]
    return "|".join([modality, *flat])


def _flatten(key: Cell | PairKey) -> list[int]:
    return [v for part in key for v in _flatten(part)] if isinstance(key, tuple) else [key]


class _Scorer:
    """Memoised, budgeted, logged access to the evaluation functions.

    The cache maps :func:`cache_key` strings to ``{"score": float | None, "seconds": float}`` and is mutated in
    place, so a caller that persists it after each ``log`` call can resume a crashed search without repeating work.
    A non-finite score (a failed probe) is stored as None, which strict JSON allows, and read back as NaN.
    """

    def __init__(self, cache: dict, budget: int | None, log: Callable[[EvalRecord], object] | None) -> None:
        self.cache = cache
        self.budget = budget
        self.log = log
        self.records: list[EvalRecord] = []
        self.seen: dict[str, float] = {}
        self.new = 0
        self.exhausted = False

    def __call__(self, stage: str, modality: str, key: Cell | PairKey, evaluate: Callable[[], float]) -> float | None:
        """Score of ``key``, or None if it is unknown and the budget is spent."""
        name = cache_key(modality, key)
        if name in self.seen:
            return self.seen[name]
        if name in self.cache:
            stored = self.cache[name]["score"]
            score, seconds, cached = math.nan if stored is None else float(stored), 0.0, True
        elif self.budget is not None and self.new >= self.budget:
            self.exhausted = True
            return None
        else:
            start = time.perf_counter()
            score = float(evaluate())
            seconds, cached = time.perf_counter() - start, False
            self.new += 1
            self.cache[name] = {"score": score if math.isfinite(score) else None, "seconds": seconds}
        self.seen[name] = score
        record = EvalRecord(stage, modality, key, score, seconds, cached)
        self.records.append(record)
        if self.log is not None:
            self.log(record)
        return score


def _hill_climb(
    start: object,
    move_sets: Sequence[Callable[[object, object | None], list]],
    score: Callable[[object], float | None],
    min_delta: float,
    strategy: str = "first",
) -> tuple[list, float] | None:
    """Greedy ascent that cycles through ``move_sets`` (one per turn) until a full cycle brings no improvement.

    A move set maps ``(current, previous)`` to candidate moves in the order to try them. With one move set this
    is plain hill climbing; the pair stage passes two (move image, move text). A move is taken only if it beats
    the current score by more than ``min_delta``, so the score rises strictly along the path and the climb
    terminates on any finite grid. ``strategy`` "first" takes the first such candidate, "best" scores them all
    and takes the best. Returns (path, final score), or None if the start itself could not be scored.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    current_score = score(start)
    if current_score is None:
        return None
    path, current = [start], start
    turn = failures = 0
    while failures < len(move_sets):
        candidates = move_sets[turn % len(move_sets)](current, path[-2] if len(path) > 1 else None)
        best = _first_better if strategy == "first" else _best_of
        found = best(candidates, score, _rank(current_score) + min_delta)
        if found is not None:
            current_score, current = found
            path.append(current)
            failures = 0
        else:
            failures += 1
        turn += 1
    return path, current_score


def _first_better(candidates: list, score: Callable[[object], float | None], bar: float) -> tuple | None:
    for cell in candidates:
        value = score(cell)
        if value is not None and _rank(value) > bar:
            return value, cell
    return None


def _best_of(candidates: list, score: Callable[[object], float | None], bar: float) -> tuple | None:
    scored = [(value, cell) for cell in candidates if (value := score(cell)) is not None]
    best = max(scored, key=lambda item: _rank(item[0]), default=None)
    return best if best is not None and _rank(best[0]) > bar else None


class _Lattice:
    """One modality's (block, t) grid, addressed by position so neighbours are index steps."""

    def __init__(self, modality: str, blocks: Sequence[int], timesteps: Sequence[int], radius: int) -> None:
        self.modality = modality
        self.blocks = _sorted_axis(f"{modality} blocks", blocks)
        self.timesteps = _sorted_axis(f"{modality} timesteps", timesteps)
        self.radius = radius

    @property
    def size(self) -> int:
        return len(self.blocks) * len(self.timesteps)

    def default_start(self) -> Cell:
        """The paper's findings: image features peak mid-network at moderate noise, text features at the last
        block on clean input (the smallest noise level on the grid)."""
        if self.modality == "image":
            return self.blocks[len(self.blocks) // 2], self.timesteps[len(self.timesteps) // 2]
        return self.blocks[-1], self.timesteps[0]

    def check(self, cell: Sequence[int]) -> Cell:
        cell = (int(cell[0]), as_time(cell[1]))
        if cell[0] not in self.blocks or cell[1] not in self.timesteps:
            raise ValueError(
                f"{self.modality} start {cell} is not on the grid: blocks {self.blocks}, timesteps {self.timesteps}"
            )
        return cell

    def neighbours(self, cell: Cell, previous: Cell | None = None) -> list[Cell]:
        """Cells within ``radius`` steps along block, timestep, or both (diagonals), in the order to try them:
        the step that continues the move ``previous -> cell`` first, then axis steps, then diagonals (nearest
        first within each group, ties in a fixed order)."""
        bi, ti = self.blocks.index(cell[0]), self.timesteps.index(cell[1])
        offsets = range(-self.radius, self.radius + 1)
        moves = [(db, dt) for db in offsets for dt in offsets if (db, dt) != (0, 0)]
        momentum = None
        if previous is not None:
            pb, pt = self.blocks.index(previous[0]), self.timesteps.index(previous[1])
            momentum = (bi - pb, ti - pt)
        moves.sort(key=lambda m: (m != momentum, m[0] != 0 and m[1] != 0, max(abs(m[0]), abs(m[1]))))
        return [
            (self.blocks[bi + db], self.timesteps[ti + dt])
            for db, dt in moves
            if 0 <= bi + db < len(self.blocks) and 0 <= ti + dt < len(self.timesteps)
        ]


def _sorted_axis(name: str, values: Sequence[int | float]) -> tuple[int | float, ...]:
    axis = tuple(as_time(v) for v in values)
    if not axis or any(a >= b for a, b in itertools.pairwise(axis)):
        raise ValueError(f"{name} must be non-empty and strictly increasing, got {list(axis)}")
    return axis


def _build_lattices(grids: dict[str, tuple[Sequence[int], Sequence[int]]], radius: int) -> dict[str, _Lattice]:
    unknown = set(grids) - set(MODALITIES)
    if not grids or unknown:
        raise ValueError(f"grids must name one or both of {MODALITIES}, got {sorted(grids)}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    return {name: _Lattice(name, *grids[name], radius) for name in MODALITIES if name in grids}


def local_search(
    evaluate_single: Callable[[str, Cell], float],
    evaluate_pair: Callable[[Cell, Cell], float] | None,
    grids: dict[str, tuple[Sequence[int], Sequence[int]]],
    options: SearchOptions | None = None,
    cache: dict | None = None,
    log: Callable[[EvalRecord], object] | None = None,
) -> SearchResult:
    """Find a locally optimal (block, t) per modality and a locally optimal image×text pair (see module doc).

    Args:
        evaluate_single: ``(modality, (block, t)) -> validation score``, higher is better (NaN counts as worst).
        evaluate_pair: ``(image cell, text cell) -> fused validation score``; None skips the pair stage, which also
            needs both modalities in ``grids``.
        grids: modality ("image" and/or "text") -> (blocks, timesteps), each strictly increasing.
        options: starts (cells on the grids; missing ones use the paper-informed defaults), budget (most *new*
            evaluations over both stages; cached scores are free), radius, strategy and min_delta; the defaults
            are ``difffeat search``'s. ``mode`` and the grid fields are the pipeline's business, not read here.
        cache: memo dict, mutated in place and JSON-serialisable; pass the same dict again to resume.
        log: called with each :class:`EvalRecord` as it is made (``print`` works; so does persisting ``cache``).
    """
    options = options or SearchOptions()
    budget, radius, min_delta, strategy = options.budget, options.radius, options.min_delta, options.strategy
    given = {"image": options.image_start, "text": options.text_start}
    starts = {name: tuple(cell) for name, cell in given.items() if cell is not None}
    lattices = _build_lattices(grids, radius)
    if set(starts) - set(lattices):
        raise ValueError(f"starts name modalities without a grid: {sorted(set(starts) - set(lattices))}")
    starts = {name: lattices[name].check(cell) for name, cell in starts.items()}
    scorer = _Scorer(cache if cache is not None else {}, budget, log)

    best, best_scores, paths = {}, {}, {}
    for name, lattice in lattices.items():

        def score_cell(cell: Cell, name: str = name) -> float | None:
            return scorer("unimodal", name, cell, lambda: evaluate_single(name, cell))

        start = starts.get(name, lattice.default_start())
        climbed = _hill_climb(start, [lattice.neighbours], score_cell, min_delta, strategy)
        if climbed is not None:
            paths[name], best_scores[name] = climbed
            best[name] = paths[name][-1]

    run_pair = evaluate_pair is not None and len(lattices) == 2
    pair_path, pair_score = [], None
    if run_pair and len(best) == 2:
        climbed = _pair_climb(evaluate_pair, lattices, (best["image"], best["text"]), scorer, min_delta, strategy)
        if climbed is not None:
            pair_path, pair_score = climbed

    grid_cells = {name: lattice.size for name, lattice in lattices.items()}
    if run_pair:
        grid_cells["pair"] = math.prod(grid_cells.values())
    return SearchResult(
        best=best,
        best_scores=best_scores,
        best_pair=pair_path[-1] if pair_path else None,
        pair_score=pair_score,
        evaluations=scorer.records,
        path=paths,
        pair_path=pair_path,
        grid_cells=grid_cells,
        budget=budget,
        budget_exhausted=scorer.exhausted,
    )


def _pair_climb(
    evaluate_pair: Callable[[Cell, Cell], float],
    lattices: dict[str, _Lattice],
    start: PairKey,
    scorer: _Scorer,
    min_delta: float,
    strategy: str,
) -> tuple[list[PairKey], float] | None:
    """Fused stage: alternate between moving the image cell (text fixed) and the text cell (image fixed)."""

    def score_pair(pair: PairKey) -> float | None:
        return scorer("pair", "pair", pair, lambda: evaluate_pair(*pair))

    def move_image(pair: PairKey, previous: PairKey | None) -> list[PairKey]:
        before = previous[0] if previous is not None and previous[1] == pair[1] else None
        return [(cell, pair[1]) for cell in lattices["image"].neighbours(pair[0], before)]

    def move_text(pair: PairKey, previous: PairKey | None) -> list[PairKey]:
        before = previous[1] if previous is not None and previous[0] == pair[0] else None
        return [(pair[0], cell) for cell in lattices["text"].neighbours(pair[1], before)]

    return _hill_climb(start, [move_image, move_text], score_pair, min_delta, strategy)
