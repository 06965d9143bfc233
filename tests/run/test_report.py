"""metrics.json is stable strict JSON; report.html is well-formed, self-contained and escapes what it is given."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffeat.run.report import format_value, read_metrics_json, render_report, to_jsonable, write_metrics_json
from difffeat.search import local_search

VOID_TAGS = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source"}


class TagChecker(HTMLParser):
    """Records tag balance problems and every src/href, so tests can judge well-formedness and self-containment."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.links: list[str] = []
        self.seen: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        self.links += [value for name, value in attrs if name in ("src", "href") and value]
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def png(path, colour=(200, 30, 30)):
    Image.new("RGB", (8, 6), colour).save(path)
    return path


@pytest.fixture
def report(tmp_path):
    search = local_search(
        lambda modality, cell: -abs(cell[0] - 2) - abs(cell[1] - 10) / 10,
        lambda image, text: 1.0,
        {"image": ([0, 1, 2, 3], [0, 10, 20]), "text": ([0, 1], [0, 100])},
    )
    path = render_report(
        tmp_path / "out" / "report.html",
        title="Diff-Feat <demo>",
        config={"dataset": "voc", "comment": "<script>alert('x')</script>", "epochs": np.int64(3)},
        metrics_table=[
            {"name": "image", "mAP": 80.123, "CF1": float("nan")},
            {"name": "fused", "mAP": np.float64(85.0), "CF1": 70.0},
        ],
        ablation_table=[{"name": "concat", "mAP": 84.3}],
        heatmaps={"image": png(tmp_path / "h1.png"), "text <&>": png(tmp_path / "h2.png", (0, 0, 255))},
        tsne=png(tmp_path / "tsne.png"),
        clustering=[{"name": "image", "silhouette": 0.5, "davies_bouldin": 0.7}],
        search=search.to_dict(),
        notes=["first note", "<b>not bold</b>"],
        curve_table=[{"name": "fused", "100 labels": 33.2, "1000 labels": 57.3}],
        curve_plot=png(tmp_path / "curve.png", (0, 200, 0)),
    )
    text = path.read_text(encoding="utf-8")
    checker = TagChecker()
    checker.feed(text)
    checker.close()
    return text, checker


def test_report_is_well_formed(report):
    text, checker = report
    assert text.startswith("<!DOCTYPE html>")
    assert checker.errors == [] and checker.stack == []
    for tag in ("html", "head", "body", "main", "section", "table", "figure", "nav"):
        assert tag in checker.seen
    assert "script" not in checker.seen


def test_report_has_every_section(report):
    text, _ = report
    for anchor in (
        "configuration",
        "metrics",
        "ablation",
        "curve",
        "heatmaps",
        "search",
        "tsne",
        "clustering",
        "notes",
    ):
        assert f'<section id="{anchor}">' in text
    curve = text.split('<section id="curve">')[1].split("</section>")[0]
    assert "<th>100 labels</th>" in curve and '<td class="num">57.30</td>' in curve and "data:image/png" in curve


def test_report_is_self_contained_with_embedded_pngs(report):
    _, checker = report
    assert not [link for link in checker.links if re.match(r"\s*(https?:)?//", link)]
    assert all(link.startswith(("#", "data:image/png;base64,")) for link in checker.links)
    images = [link for link in checker.links if link.startswith("data:")]
    assert len(images) == 4  # two heatmaps, the label-efficiency curve and the t-SNE picture
    for uri in images:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.size == (8, 6)


def test_report_escapes_user_text(report):
    text, checker = report
    assert "<script>" not in text and "<b>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    shown = "".join(checker.text)
    assert "<script>alert('x')</script>" in shown and "Diff-Feat <demo>" in shown and "text <&>" in shown


def test_report_formats_numbers_and_summarises_the_search(report):
    text, _ = report
    assert ">80.12<" in text and ">85.00<" in text and ">–<" in text  # NaN CF1 shown as a dash
    assert "epochs: 3" in text  # a numpy value in the config became a plain int
    assert "davies_bouldin ↓" in text and "silhouette ↑" in text
    assert "block 2, t 10" in text  # the image optimum of the landscape above
    assert "full grid" in text and "pair 48" in text


def test_empty_optional_sections_are_left_out(tmp_path):
    path = render_report(
        tmp_path / "r.html",
        title="t",
        config={},
        metrics_table=[{"name": "image", "mAP": 1.0}],
        ablation_table=[],
        heatmaps={},
        tsne=None,
        clustering=[],
        search=None,
        notes=[],
    )
    sections = re.findall(r'<section id="(\w+)">', path.read_text(encoding="utf-8"))
    assert sections == ["metrics", "configuration"]  # results first, configuration last


def test_non_png_images_are_refused(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        render_report(
            tmp_path / "r.html",
            title="t",
            config={},
            metrics_table=[],
            ablation_table=[],
            heatmaps={"x": fake},
            tsne=None,
            clustering=[],
            search=None,
            notes=[],
        )


def test_metrics_json_is_stable_strict_and_round_trips(tmp_path):
    summary = {
        "fused": {"mAP": np.float32(85.5), "OF1": float("nan"), "CP": np.float64(1.25)},
        "image": {"mAP": 80.0, "CR": float("inf")},
        "chosen": {"image": (11, np.int64(500)), "text": [11, 0]},
        "counts": np.array([3, 4]),
        "by_cell": {(11, 500): 1.0},
    }
    path = write_metrics_json(tmp_path / "m" / "metrics.json", summary)
    text = path.read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert list(json.loads(text)) == sorted(summary)
    data = read_metrics_json(path)
    assert data["fused"] == {"mAP": 85.5, "OF1": None, "CP": 1.25}
    assert data["image"]["CR"] is None
    assert data["chosen"] == {"image": [11, 500], "text": [11, 0]}
    assert data["counts"] == [3, 4] and data["by_cell"] == {"11,500": 1.0}
    write_metrics_json(tmp_path / "again.json", dict(reversed(summary.items())))
    assert (tmp_path / "again.json").read_text(encoding="utf-8") == text  # key order does not leak into the file
    assert not list(tmp_path.glob("**/*.tmp"))


def test_to_jsonable_names_the_bad_field():
    with pytest.raises(TypeError, match=r"summary\.fused\.head"):
        to_jsonable({"fused": {"head": object()}}, "summary")


@pytest.mark.parametrize(
    ("value", "text"),
    [(85.123, "85.12"), (float("nan"), "–"), (None, "–"), (True, "yes"), (7, "7"), ([11, 500], "(11, 500)")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def load_render_script():
    """The render checker is a script, not a module: load it from its path."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "check_report_render.py"
    spec = importlib.util.spec_from_file_location("check_report_render", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_script_explains_a_missing_browser(tmp_path, monkeypatch, capsys):
    script = load_render_script()
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    page = tmp_path / "r.html"
    page.write_text("<!DOCTYPE html><html></html>", encoding="utf-8")
    assert script.main([str(page), str(tmp_path / "shot.png")]) == 2
    assert "no headless browser found" in capsys.readouterr().err


def test_render_script_counts_colours_to_spot_blank_pages(tmp_path):
    script = load_render_script()
    assert script.distinct_colours(png(tmp_path / "blank.png")) == 1
    two = Image.new("RGB", (4, 4), "white")
    two.putpixel((0, 0), (0, 0, 0))
    two.save(tmp_path / "two.png")
    assert script.distinct_colours(tmp_path / "two.png") == 2


def test_a_failed_write_keeps_the_old_files_and_leaves_no_temp_file(tmp_path, monkeypatch):
    write_metrics_json(tmp_path / "metrics.json", {"mAP": 1.0})

    def disk_gone(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr("os.replace", disk_gone)
    with pytest.raises(OSError, match="rename failed"):
        write_metrics_json(tmp_path / "metrics.json", {"mAP": 2.0})
    assert read_metrics_json(tmp_path / "metrics.json") == {"mAP": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_records_left_out_are_listed_one_by_one(tmp_path):
    skipped = [{"record": f"img<{i}>", "reason": "cannot decode image", "left out by": "image check (train)"}
               for i in range(3)]  # fmt: skip
    common = {"title": "t", "config": {}, "metrics_table": [{"name": "image", "mAP": 1.0}], "ablation_table": [],
              "heatmaps": {}, "tsne": None, "clustering": [], "search": None, "notes": []}  # fmt: skip
    text = render_report(tmp_path / "r.html", **common, skipped=skipped).read_text(encoding="utf-8")
    assert re.findall(r'<section id="(\w+)">', text) == ["metrics", "skipped", "configuration"]
    assert "3 records, each with its reason" in text
    assert all(f"<td>img&lt;{i}&gt;</td>" in text for i in range(3)) and text.count("cannot decode image") == 3
    empty = render_report(tmp_path / "e.html", **common).read_text(encoding="utf-8")
    assert 'id="skipped"' not in empty
