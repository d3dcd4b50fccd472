"""``crossmodal-kd report``: one self-contained HTML page per run or benchmark directory."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import read_json, run_config, tiny_config
from crossmodal_kd.bench import BenchConfig, Experiment, Row, markdown_table, summarize, write_reports
from crossmodal_kd.cli import main

VOID = {"meta", "img", "br", "hr", "input", "link"}


class Page(HTMLParser):
    """The page's images (data URIs), table rows (cell texts), link targets and text; checks tags nest."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed tags {self.open}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.cell = []
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parse(path: Path) -> Page:
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # no external assets
    return Page(text)


def decoded_pngs(page: Page) -> list[Image.Image]:
    images = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        Image.open(io.BytesIO(data)).verify()
        images.append(Image.open(io.BytesIO(data)))
    return images


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_config(tiny_config(), run_dir, fast_dev_run=True)
    return run_dir


def test_run_report_has_the_results_curves_environment_and_config(tiny_run, capsys):
    assert main(["report", str(tiny_run)]) == 0
    path = tiny_run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = parse(path)
    metrics = read_json(tiny_run / "metrics.json")
    for stage in ("teacher", "baseline", "kd"):
        result = read_json(tiny_run / "stages" / stage / "result.json")
        assert result["models"] == metrics["stages"][stage]["models"]
        for model, m in result["models"].items():
            row = [stage, model, pct(m["val"]["accuracy"]), pct(m["val"]["macro_f1"]),
                   pct(m["test"]["accuracy"]), pct(m["test"]["macro_f1"]), str(m["best_epoch"])]
            assert row in page.rows
    assert len(decoded_pngs(page)) == 3 + 1  # each stage's curves, the accuracy chart
    text = "".join(page.text)
    assert "world_size" in text and "fast_dev_run" in text  # environment.json
    assert (tiny_run / "config.yaml").read_text() in text  # the resolved config, verbatim
    assert "Routing" not in text


def test_routing_and_unfinished_stages(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("report.html"))
    routed = run / "stages" / "routed"
    routed.mkdir()
    result = read_json(run / "stages" / "kd" / "result.json")
    result["routing"] = {"max_entropy": 0.6931, "entropy": [0.6, 0.5], "best_hit": [0.4, 0.5],
                         "shares": {"teacher_mm": [0.7, 0.6], "teacher_cm": [0.3, 0.4]}}
    (routed / "result.json").write_text(json.dumps(result))
    rows = [{"stage": "routed", "epoch": e, "lr": 0.1, "train/loss": 1.0 - e / 10, "route/share/teacher_mm": 0.7} for e in (0, 1)]
    (routed / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "stages" / "started").mkdir()
    (run / "stages" / "started" / "log.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(["report", str(run)]) == 0
    page = parse(run / "report.html")
    text = "".join(page.text)
    assert "Routing" in text
    stages = [row[0] for row in page.rows if len(row) == 7 and row[2] in ("finished", "in progress")]
    assert stages == ["teacher", "baseline", "kd", "routed", "started"]  # the config's order, then the others
    assert ["started", "?", "in progress", "1 logged", "-", "-", "-"] in page.rows  # no result.json yet
    assert len(decoded_pngs(page)) == 5 + 1 + 1  # every stage's curves, the accuracy chart, routed's routing


def test_bench_report_is_written_by_write_reports(tiny_run, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(tiny_run, out / "tiny" / "image" / "seed0", ignore=shutil.ignore_patterns("report.html"))
    records = [{"method": method, "variant": "image", "seed": seed, "test_accuracy": acc + 0.01 * seed, "test_macro_f1": acc,
                "val_accuracy": acc, "train_time_s": 1.0, "samples_per_s": 10.0, "peak_memory_mb": 5.0, "gate_entropy": None}
               for seed in range(3) for method, acc in (("student only", 0.5), ("KD", 0.6))]
    bench = BenchConfig(output_dir=str(out), reference="student only", experiments=[
        Experiment(config="tiny.yaml", rows=[Row(label="student only", stage="baseline", model="model"), Row(label="KD", stage="kd")])])
    write_reports(bench, records)
    page = parse(out / "report.html")
    table = markdown_table(summarize(records, "student only"), "student only")
    for line in [x for x in table.splitlines()[2:] if x.startswith("|")]:  # the rows, not the notes under them
        assert [c.strip() for c in line.strip().strip("|").split("|")] in page.rows
    (chart,) = decoded_pngs(page)
    assert chart.size == Image.open(out / "results.png").size
    assert page.links[-1] == "tiny/image/seed0/report.html"
    run_page = parse(out / "tiny" / "image" / "seed0" / "report.html")
    assert len(decoded_pngs(run_page)) == 4


def test_report_of_another_directory_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: FileNotFoundError: {tmp_path}: neither a run directory (stages/) nor a benchmark directory (records.json)"
