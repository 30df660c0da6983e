"""The report a user shares: one self-contained HTML file (pictures embedded, nothing linked), the
held-out split said first, scikit-learn's classification report, confusion matrices normalised by
row for val and test, per-class F1, the settings of the head that ran, and a page comparing a
sweep's runs. Opened in a headless browser, every section shows and no image is broken."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
import featcache.plots
import featcache.report
from featcache.cli import main
from featcache.heads import C_GRID
from featcache.sweep import sweep
from featcache.tails import load_head

from .helpers import TINY, make_folder

MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
CHROMIUM = Path("/usr/bin/chromium")
RUN_SECTIONS = ("summary", "metrics", "classification-val", "classification-test", "per-class", "confusion-val",
                "confusion-test", "curves", "misclassified", "settings")


@pytest.fixture(scope="module")
def confusable(tmp_path_factory):
    """Two classes of the same colour (a head must get some wrong), a `$` in a class name, and a test split."""
    root = tmp_path_factory.mktemp("report")
    folder = make_folder(root / "d", splits=(("train", 8), ("val", 4), ("test", 4)),
                         classes={"a$x$": (200, 30, 30), "b": (200, 30, 30), "c": (30, 30, 200)})
    store = str(root / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0)
    return {"store": store, "data": folder, "root": root}


@pytest.fixture(scope="module")
def mlp_run(confusable):
    pytest.importorskip("matplotlib")
    res = featcache.fit(head="mlp", store=confusable["store"], epochs=4, runs=str(confusable["root"] / "runs"),
                        data=str(confusable["data"]))
    return res


class _Page(HTMLParser):
    """Every tag's attributes and the ids of the page's sections."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def _check_self_contained(page: str) -> list[tuple[str, dict]]:
    """Every image is embedded data that decodes as what it says; nothing refers to a file beside the page."""
    parsed = _parse(page)
    images = [a for t, a in parsed.tags if t == "img"]
    for a in images:
        m = re.fullmatch(r"data:(image/png|image/jpeg);base64,([A-Za-z0-9+/=]+)", a.get("src", ""))
        assert m, a.get("src", "")[:80]
        assert base64.b64decode(m.group(2), validate=True).startswith(MAGIC[m.group(1)])
    for tag, a in parsed.tags:
        for attr in ("src", "href"):
            assert attr not in a or a[attr].startswith(("data:", "#")), (tag, attr, a[attr][:80])
    assert "url(" not in page and "@import" not in page  # no stylesheet pulls a file either
    return images


def test_fit_writes_one_self_contained_report_with_every_section(mlp_run, confusable):
    run = mlp_run.run_dir
    page = (run / "report.html").read_text()
    images = _check_self_contained(page)
    ids = {a.get("id") for _, a in _parse(page).tags}
    assert set(RUN_SECTIONS) <= ids, set(RUN_SECTIONS) - ids
    # the pictures are embedded, and the PNGs stay in the run folder for those who want the files
    names = {a["title"] for a in images}
    assert names == {"curves.png", "confusion.png", "confusion_test.png", "per_class.png", "misclassified.png"}
    assert all((run / n).read_bytes().startswith(MAGIC["image/png"]) for n in names)
    # a copy of the page alone, mailed away from its folder, loses nothing
    alone = confusable["root"] / "mailed" / "report.html"
    alone.parent.mkdir()
    shutil.copy(run / "report.html", alone)
    _check_self_contained(alone.read_text())


def test_the_held_out_split_and_the_biased_one_are_said_first(mlp_run):
    page = (mlp_run.run_dir / "report.html").read_text()
    held = page.index("test is held out")
    biased = page.index("val is selection-biased")
    assert held < page.index('id="metrics"') and biased < page.index('id="metrics"')
    assert "epoch chosen on val loss" in page[biased:page.index('id="metrics"')]
    test_top1 = mlp_run.metrics["test"]["top1"]
    assert f"top-1 <b>{test_top1:.4f}</b>" in page[held:biased]


def test_classification_report_is_scikit_learns(mlp_run):
    from sklearn.metrics import classification_report

    page = (mlp_run.run_dir / "report.html").read_text()
    classes = ["a$x$", "b", "c"]
    for split in ("val", "test"):
        cm = np.asarray(mlp_run.metrics[split]["confusion_matrix"])
        y = np.repeat(np.arange(3), cm.sum(1))
        pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
        want = classification_report(y, pred, labels=[0, 1, 2], target_names=classes, output_dict=True,
                                      zero_division=0)  # the averages as fit records them
        # per class, a precision of a class never predicted is undefined: shown as "-", never as 0
        each = classification_report(y, pred, labels=[0, 1, 2], target_names=classes, output_dict=True,
                                     zero_division=np.nan)
        shown = lambda v: "-" if np.isnan(v) else f"{v:.4f}"
        start = page.index(f'id="classification-{split}"')
        table = page[start:page.index("</table>", start)]
        rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]
        cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
        got = {c[0]: c[1:] for c in cells}
        for name in classes:
            row = each[name]
            assert got[name] == [shown(row["precision"]), shown(row["recall"]), shown(row["f1-score"]),
                                 str(int(row["support"]))], (split, name)
        for avg in ("macro avg", "weighted avg"):
            row = want[avg]
            assert got[avg][:3] == [f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1-score']:.4f}"]
        assert got["accuracy"][2] == f"{want['accuracy']:.4f}"


def test_confusion_matrix_rows_are_shares_of_the_true_class():
    from featcache.plots import normalised

    cm = [[3, 1, 0], [0, 0, 0], [2, 2, 4]]
    share = normalised(cm)
    assert np.allclose(share[[0, 2]].sum(1), 1) and np.isnan(share[1]).all()
    assert np.allclose(share[2], [0.25, 0.25, 0.5])


def test_settings_are_those_of_the_head_that_ran(confusable, tmp_path):
    pytest.importorskip("matplotlib")
    settings = {}
    for head, options in (("mlp", {"optimizer": "adam", "epochs": 2}), ("linear", {"optimizer": "sgd", "epochs": 2}),
                          ("logreg", {"C": 1.0})):
        res = featcache.fit(head=head, store=confusable["store"], runs=str(tmp_path / "runs"), **options)
        page = (res.run_dir / "report.html").read_text()
        start = page.index(f"<h3>{head} head</h3>")
        settings[head] = dict(re.findall(r"<tr><td>([^<]*)</td><td[^>]*>([^<]*)</td></tr>",
                                         page[start:page.index("</table>", start)]))
    assert {"lr", "hidden", "dropout", "optimizer", "epochs"} <= set(settings["mlp"])
    assert not {"momentum", "step_size", "gamma"} & set(settings["mlp"])  # Adam takes none of them
    assert settings["linear"]["optimizer"] == "sgd" and {"momentum", "step_size", "gamma"} <= set(settings["linear"])
    assert "hidden" not in settings["linear"]
    assert set(settings["logreg"]) == {"C", "max_iter", "seed"}  # no epochs, no learning rate


def test_report_command_draws_from_the_run_alone_and_the_grid_from_data(mlp_run, confusable):
    run = mlp_run.run_dir
    (run / "misclassified.png").unlink()
    r = CliRunner().invoke(main, ["report", str(run)])  # images are read only from a folder the user names
    assert r.exit_code == 0 and r.output == f"wrote {run / 'report.html'}\n", r.output
    page = (run / "report.html").read_text()
    assert 'id="misclassified"' not in page and not (run / "misclassified.png").exists()
    r = CliRunner().invoke(main, ["report", str(run), "--data", str(confusable["data"])])
    assert r.exit_code == 0 and (run / "misclassified.png").exists(), r.output
    assert 'id="misclassified"' in (run / "report.html").read_text()


def test_a_sweep_page_compares_the_runs(confusable, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sw"
    r = CliRunner().invoke(main, ["fit", "--store", confusable["store"], "--head", "linear", "--lr", "1e-3,1e-2,1e-1",
                                  "--epochs", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "sweep.json").read_text())
    page = (out / "report.html").read_text()
    parsed = _parse(page)
    start = page.index("<tbody>", page.index('id="runs"'))
    rows = re.findall(r"<tr( class=\"best\")?>(.*?)</tr>", page[start:page.index("</tbody>", start)])
    assert len(rows) == 3 and [bool(best) for best, _ in rows] == [True, False, False]  # best first, marked
    for row, want in zip(rows, doc["rows"]):
        assert want["run"] in row[1] and f"{want['val_top1']:.4f}" in row[1] and f"{want['test_top1']:.4f}" in row[1]
    links = [a["href"] for t, a in parsed.tags if t == "a"]
    assert links == [f"{doc['best']}/report.html"] and (out / links[0]).is_file()  # only the best run has a report
    images = [a for t, a in parsed.tags if t == "img"]
    assert len(images) == 1 and images[0]["src"].startswith("data:image/png;base64,")
    assert "<b>test is held out</b>" in page and "val is selection-biased" in page
    (out / "report.html").unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and r.output == f"wrote {out / 'report.html'}\n" and (out / "report.html").is_file()


def test_without_matplotlib_fit_says_how_and_report_is_an_error(confusable, tmp_path, monkeypatch):
    monkeypatch.setattr(featcache.report, "have_matplotlib", lambda: False)
    monkeypatch.setattr(featcache.plots, "have_matplotlib", lambda: False)
    res = featcache.fit(head="linear", store=confusable["store"], epochs=2, runs=str(tmp_path / "runs"))
    assert res.notes[-1] == "plots skipped: matplotlib is not installed (pip install 'featcache[plots]')"
    assert not any(p.suffix in (".png", ".html") for p in res.run_dir.iterdir())
    r = CliRunner().invoke(main, ["report", str(res.run_dir)])
    assert r.exit_code == 1 and r.output == "Error: plots need matplotlib: pip install 'featcache[plots]'\n"


def test_sklearn_heads_choose_C_by_cross_validation_of_train_and_record_it(confusable, tmp_path):
    res = featcache.fit(head="logreg", store=confusable["store"], runs=str(tmp_path / "runs"), plots=False)
    info = json.loads((res.run_dir / "config.json").read_text())
    assert info["C"] in C_GRID and res.chosen_C == info["C"]
    search = info["C_search"]
    assert search["by"] == "5-fold cross-validated accuracy" and len(search["scores"]) == len(search["grid"])
    # C was chosen on train alone, so val and test are held out (test is the score); nothing warns
    assert info["selection"] == {"chosen": [{"what": "C", "on": "5-fold cross-validated accuracy of train"}],
                                 "biased": [], "score": "test"}
    assert res.notes == [] and "test top-1" in res.summary() and "(held out)" in res.summary()
    assert set(C_GRID) <= set(search["grid"])  # a C at the edge of the grid extends it
    assert info["C"] == load_head(res.run_dir).C_
    page = featcache.report.write_report(res.run_dir).read_text() if featcache.report.have_matplotlib() else ""
    if page:  # every C tried, with its score, the chosen one marked
        assert "C search (5-fold cross-validated accuracy)" in page and f"<td>{info['C']:g} (chosen)</td>" in page
    fixed = featcache.fit(head="svm", store=confusable["store"], C=0.5, runs=str(tmp_path / "runs"), plots=False)
    assert fixed.chosen_C == 0.5


def test_C_by_cross_validation_without_a_val_split(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 10),))
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0)
    res = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"), plots=False)
    info = json.loads((res.run_dir / "config.json").read_text())
    assert info["C_search"]["by"] == "5-fold cross-validated accuracy"
    assert set(res.metrics) == {"train"}


_PROBE = """<script>window.addEventListener("load", function () {
  var out = document.createElement("pre"); out.id = "probe";
  out.textContent = JSON.stringify({images: Array.from(document.images).map(function (i) {
      return [i.title, i.complete, i.naturalWidth, i.getBoundingClientRect().width]; }),
    sections: Array.from(document.querySelectorAll("section")).map(function (s) {
      return [s.id, s.getBoundingClientRect().height]; })});
  document.body.appendChild(out); });</script>"""


def _browser_sees(page: Path, tmp_path: Path) -> dict:
    """What a headless Chromium shows of ``page``, copied alone into an empty folder (as a mailed file)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no headless browser: {CHROMIUM} is absent (apt-get install -y chromium)")
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    alone.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    p = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--window-size=1200,900", "--virtual-time-budget=5000", "--dump-dom", alone.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', p.stdout, re.S)
    assert m, p.stderr[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_in_a_browser_every_section_shows_and_no_image_is_broken(mlp_run, tmp_path):
    seen = _browser_sees(mlp_run.run_dir / "report.html", tmp_path)
    sections = dict(seen["sections"])
    assert set(RUN_SECTIONS) <= set(sections) and all(h > 0 for h in sections.values()), sections
    assert len(seen["images"]) == 5
    for title, complete, width, shown in seen["images"]:
        assert complete and width > 0 and shown > 0, (title, width)  # decoded and laid out, not a broken icon


def test_in_a_browser_a_sweep_page_shows_its_plot(confusable, tmp_path):
    pytest.importorskip("matplotlib")
    base = featcache.FitConfig(store=confusable["store"], head="linear", epochs=2, out=str(tmp_path / "sw"))
    res = sweep(base, {"lr": [1e-3, 1e-2]})
    seen = _browser_sees(res.folder / "report.html", tmp_path)
    assert {"summary", "runs", "sweep-plot", "grid"} <= {s for s, _ in seen["sections"]}
    assert len(seen["images"]) == 1 and seen["images"][0][2] > 0


@pytest.mark.slow
def test_report_benchmark_runs(mlp_run):
    from benchmarks.report import run_report

    rows = run_report(str(mlp_run.run_dir), rounds=1)
    assert [r["way"] for r in rows] == ['python -c "import torch"', "featcache report (this checkout)"]
    assert all(r["median_s"] > 0 for r in rows)


def test_a_run_of_an_older_featcache_is_reported_with_what_it_recorded(mlp_run, tmp_path):
    """Runs from before precision/recall/F1 and model selection were recorded: recall (per-class accuracy)
    and support from the confusion matrix, and a note that no selection is recorded."""
    run = Path(shutil.copytree(mlp_run.run_dir, tmp_path / "old"))
    metrics = json.loads((run / "metrics.json").read_text())
    for m in metrics.values():
        for key in ("per_class", "macro", "weighted", "balanced_accuracy"):
            m.pop(key, None)
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = json.loads((run / "config.json").read_text())
    config.pop("selection")
    (run / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 0, r.output
    page = (run / "report.html").read_text()
    _check_self_contained(page)
    assert "records no model selection" in page and 'id="per-class"' in page
    recall = metrics["val"]["per_class_accuracy"]["b"]
    assert f"<tr><td>b</td><td>-</td><td class=\"n\">{recall:.4f}</td><td>-</td>" in page


def test_a_damaged_or_hostile_sweep_file_is_one_error_and_text_is_never_markup(mlp_run, tmp_path):
    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"grid": {"lr": [1, 2]}, "best": "x", "rows": "many"}))
    r = CliRunner().invoke(main, ["report", str(folder)])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {folder}: sweep.json field 'rows'"), r.output
    assert not (folder / "report.html").exists()
    name = '<img src=x onerror="alert(1)">'
    row = {"rank": 1, "run": name, "head": "mlp", "lr": 1.0, "val_top1": 0.5, "test_top1": None}
    (folder / "sweep.json").write_text(json.dumps({"grid": {"lr": [1.0]}, "best": name, "rows": [row],
                                                   "notes": ["<script>x</script>"], "selection": {"chosen": 5}}))
    r = CliRunner().invoke(main, ["report", str(folder)])
    assert r.exit_code == 0, r.output
    page = (folder / "report.html").read_text()
    assert "<img" not in page and "<script>x" not in page and html_escape(name) in page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)
