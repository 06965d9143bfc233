"""Run outputs people and programs read: ``metrics.json`` and a single self-contained ``report.html``.

``metrics.json`` is written with sorted keys, strict JSON (NaN/inf become null) and plain Python types, so two runs
with the same results give byte-identical files that diff cleanly. ``report.html`` embeds its images as base64
data URIs, keeps its CSS inline and uses no JavaScript: it can be mailed, archived or opened offline and always shows
the same thing. Every piece of text is passed through ``html.escape``, because configs and notes are user input.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from difffeat.analysis import CLUSTERING_BETTER
from difffeat.utils.io import atomic_write_text
from difffeat.utils.options import Options, option


@dataclass
class ReportOptions(Options):
    """What the report draws. Nothing here is cached: the report is rebuilt from the run's results every time."""

    tsne_samples: int = option(1000, min=1, help="test samples in the t-SNE pictures and clustering scores")
    tsne_classes: int = option(10, min=1, help="most frequent classes coloured in the t-SNE pictures")
    html: bool = option(True, help="write report.html")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MISSING = "–"

# The browser enforces what the tests check: nothing is fetched from elsewhere and no script runs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d232a;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { margin-top: 0; }
h2 { border-bottom: 2px solid #dfe3e8; padding-bottom: 4px; margin-top: 36px; }
nav ul { display: flex; flex-wrap: wrap; gap: 6px 18px; padding: 0; list-style: none; }
pre { background: #f3f4f6; padding: 12px; overflow-x: auto; font-size: 13px; border-radius: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d0d5db; padding: 4px 10px; }
th { background: #eef1f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; }
figcaption { font-size: 14px; color: #4a5561; margin-top: 4px; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 4px 16px; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
"""


# ---------------------------------------------------------------------------------------------- metrics.json


def to_jsonable(value: object, where: str = "value") -> object:
    """Plain JSON types from what a pipeline holds: numpy/torch values (via ``tolist``), objects with ``to_dict``,
    tuples, paths; non-finite floats become None and non-string keys become strings ("11,500" for a tuple).
    ``where`` names the offending entry in the error, so a bad field in a large summary is easy to find."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_json_key(key): to_jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict(), where)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist(), where)
    raise TypeError(f"{where}: cannot write {type(value).__name__} to JSON")


def _json_key(key: object) -> str:
    if isinstance(key, tuple):
        return ",".join(str(part) for part in key)
    return str(key)


def write_metrics_json(path: str | Path, summary: Mapping) -> Path:
    """Write ``summary`` as stable, strict JSON (sorted keys, 2-space indent, NaN -> null)."""
    data = to_jsonable(summary, "summary")
    atomic_write_text(path, json.dumps(data, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    return Path(path)


def read_metrics_json(path: str | Path) -> dict:
    """Read a file written by :func:`write_metrics_json` (missing values come back as None)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- formatting


def format_value(value: object) -> str:
    """Table text for one value: floats to 2 decimals, missing/NaN as a dash, cells as (block, t)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(item) for item in value) + ")"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {format_value(item)}" for key, item in value.items())
    return str(value)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _td(value: object) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_e(format_value(value))}</td>' if numeric else f"<td>{_e(format_value(value))}</td>"


def _table(rows: Sequence[Mapping], better: Mapping[str, str] | None = None) -> str:
    """HTML table; columns are every key in first-seen order, "name" first. ``better`` adds ↑/↓ to headers."""
    rows = [to_jsonable(row, "row") for row in rows]
    columns = sorted(dict.fromkeys(key for row in rows for key in row), key=lambda column: column != "name")
    arrows = {"higher": " ↑", "lower": " ↓"}
    head = "".join(f"<th>{_e(column)}{arrows.get((better or {}).get(column, ''), '')}</th>" for column in columns)
    body = "".join("<tr>" + "".join(_td(row.get(column)) for column in columns) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _png_data_uri(path: str | Path) -> str:
    """Embed a PNG; anything else is refused so the report never carries a file the browser cannot show."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(path: str | Path, caption: str) -> str:
    return (
        f'<figure><img src="{_png_data_uri(path)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


# ---------------------------------------------------------------------------------------------- sections


def _config_section(config: Mapping) -> str:
    text = yaml.safe_dump(to_jsonable(config, "config"), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"<pre>{_e(text)}</pre>"


def _summary_list(items: Sequence[tuple[str, str]]) -> str:
    return '<dl class="summary">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _cell_text(cell: object) -> str:
    return f"block {cell[0]}, t {cell[1]}" if isinstance(cell, (list, tuple)) and len(cell) == 2 else _MISSING


def _search_section(search: Mapping) -> str:
    """Evaluations made against the cost of the full grid, the optima found, and every evaluation on request."""
    search = to_jsonable(search, "search")
    made, grid = search.get("num_evaluations"), search.get("grid_size")
    share = f" ({100.0 * made / grid:.2f}% of the grid)" if made is not None and grid else ""
    cells = search.get("grid_cells", {})
    items = [
        ("cells scored", f"unimodal {search.get('num_scored_unimodal')}, pair {search.get('num_scored_pair')}"),
        ("new evaluations in this run", f"{made}{share}"),
        ("by stage", f"unimodal {search.get('num_evaluations_unimodal')}, pair {search.get('num_evaluations_pair')}"),
        ("re-used from cache", format_value(search.get("num_cached"))),
        ("full grid", f"{grid} cells: " + ", ".join(f"{name} {count}" for name, count in cells.items())),
        ("budget", "unlimited" if search.get("budget") is None else f"{search['budget']}"),
        ("stopped by budget", format_value(search.get("budget_exhausted"))),
    ]
    for modality, cell in search.get("best", {}).items():
        score = format_value(search.get("best_scores", {}).get(modality))
        items.append((f"best {modality}", f"{_cell_text(cell)} → {score}"))
    pair = search.get("best_pair")
    if pair:
        pair_text = f"image {_cell_text(pair[0])} + text {_cell_text(pair[1])}"
        items.append(("best pair", f"{pair_text} → {format_value(search.get('pair_score'))}"))
    evaluations = search.get("evaluations") or []
    details = ""
    if evaluations:
        details = (
            f"<details><summary>all {len(evaluations)} evaluations, in order</summary>{_table(evaluations)}</details>"
        )
    return _summary_list(items) + details


def _curve_section(rows: Sequence[Mapping], plot: str | Path | None) -> str:
    if not rows:
        return ""
    figure = _figure(plot, "every head refitted on the first n train rows") if plot else ""
    return _table(rows) + figure


def _skipped_section(skipped: Sequence[Mapping]) -> str:
    return f"<details><summary>{len(skipped)} records, each with its reason</summary>{_table(skipped)}</details>"


def _figures(images: Mapping[str, str | Path]) -> str:
    return "\n".join(_figure(path, name) for name, path in images.items())


def _notes(notes: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul>"


def _document(title: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<li><a href="#{anchor}">{_e(heading)}</a></li>' for anchor, heading, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>'
        for anchor, heading, content in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{_e(title)}</h1>
<nav><ul>{nav}</ul></nav>
{body}
</main>
</body>
</html>
"""


def render_report(
    path: str | Path,
    *,
    title: str,
    config: Mapping,
    metrics_table: Sequence[Mapping],
    ablation_table: Sequence[Mapping],
    heatmaps: Mapping[str, str | Path],
    tsne: str | Path | None,
    clustering: Sequence[Mapping],
    search: Mapping | None,
    notes: Sequence[str],
    skipped: Sequence[Mapping] = (),
    curve_table: Sequence[Mapping] = (),
    curve_plot: str | Path | None = None,
) -> Path:
    """Write one self-contained ``report.html`` and return its path.

    Table rows are dicts with a "name" and one key per column (numbers are shown to 2 decimals, None/NaN as a
    dash). ``search`` is ``SearchResult.to_dict()`` or the same shape. ``skipped`` lists every record left out of
    the run with its reason (a count alone cannot be checked). ``curve_table`` / ``curve_plot``: the
    label-efficiency curve, every head's test score at each labeled-set size. Sections with nothing to show are
    left out, except configuration and metrics, which every report has.
    """
    # What a reader looks for first comes first: results and the run's checks; the configuration closes the page.
    candidates = [
        ("metrics", "Metrics (fused vs unimodal, %)", _table(metrics_table)),
        ("notes", "Checks and notes", _notes(notes) if notes else ""),
        ("ablation", "Ablation", _table(ablation_table) if ablation_table else ""),
        ("curve", "Label efficiency (test score by labeled train rows)", _curve_section(curve_table, curve_plot)),
        ("heatmaps", "Validation heatmaps and search path", _figures(heatmaps)),
        ("search", "Local search", _search_section(search) if search else ""),
        ("tsne", "t-SNE", _figure(tsne, "t-SNE of the test features, coloured by class") if tsne else ""),
        ("clustering", "Clustering scores", _table(clustering, CLUSTERING_BETTER) if clustering else ""),
        ("skipped", "Records left out", _skipped_section(skipped) if skipped else ""),
        ("configuration", "Configuration", _config_section(config)),
    ]
    sections = [section for section in candidates if section[2] or section[0] in ("configuration", "metrics")]
    atomic_write_text(path, _document(title, sections))
    return Path(path)
