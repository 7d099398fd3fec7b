"""The promoted model's card and report: the card's Hub metadata reads back with the holdout figures,
its reference standards follow the sources actually used, and report.html renders in a real
browser (headless Chromium) with its title and ROC figure drawn where the page lays them out."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# --disable-background-networking and friends: without them Chromium waits on the network, and
# hangs on a closed one
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,2400"]
_INDEX = {"auc": "roc_auc", "sensitivity": "recall", "specificity": "specificity", "accuracy": "accuracy"}
_REFERENCE = re.compile(r"^- Reference standard \(([^)]+)\): (.+)$", re.M)


def _load_card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_model_card_metadata_reads_back_the_holdout_figures(promoted_run):
    card, loaded = promoted_run["card"], _load_card(promoted_run["model"] / "model_card.md")
    pooled = card.holdout["pooled"]
    results = {e.metric_type: e for e in loaded.data.eval_results}
    assert len(results) == len(loaded.data.eval_results) == 3 * len(_INDEX)  # value, CI lower, CI upper
    for key, metric in _INDEX.items():
        assert results[metric].metric_value == pooled[key], key
        assert [results[f"{metric}_ci95_{end}"].metric_value for end in ("lower", "upper")] == pooled["ci95"][key]
        assert results[f"{metric}_ci95_lower"].metric_args["n_boot"] == pooled["ci95"]["n_boot_used"]
    for metric in ("recall", "specificity", "accuracy"):  # thresholded: the threshold travels with the figure
        assert results[metric].metric_args == {"threshold": card.threshold, "threshold_rule": card.threshold_rule}
    assert {(e.task_type, e.dataset_type, e.dataset_split, e.dataset_revision) for e in results.values()} == {
        ("image-classification", "kermany", "holdout", card.data["fingerprint"])}
    data = loaded.data
    assert (data.license, data.datasets, data.pipeline_tag, data.library_name, data.model_name) == (
        "cc-by-4.0", ["kermany"], "image-classification", "raycxr", card.run)
    assert {"medical-imaging", "chest-x-ray", "pneumonia", "timm"} <= set(data.tags)
    # the whole Markdown body is still below the header
    for heading in ("# Model card:", "## Intended use and limitations", "## Model selection",
                    "## Operating threshold and calibration", "## Holdout metrics", "### Operating points",
                    "### Per source", "## External validation", "## Data", "## Selected trial", "## Exports",
                    "## Software"):
        assert re.search(rf"^{re.escape(heading)}", loaded.text, re.M), heading
    assert [name for name, _ in _REFERENCE.findall(loaded.text)] == ["kermany"]
    assert "two expert physicians" in loaded.text


def _with_sources(card, by_source: dict[str, int], options: dict | None = None):
    """The promoted card, as if its data had come from ``by_source`` (images per source and split)."""
    card = copy.deepcopy(card)
    for counts in card.data["counts"].values():
        counts["by_source"] = dict(by_source)
        counts["patients_by_source"] = dict(by_source)
    card.data["params"]["source_options"] = options or {}
    return card


@pytest.mark.parametrize("by_source, options, expected, licence", [
    ({"nih": 9, "rsna": 4}, None, {"nih": "mined from the radiology reports by NLP", "rsna": "bounding boxes"},
     "other"),
    ({"kermany": 5, "pneumoniamnist": 7}, None, {"kermany": "two expert physicians",
                                                "pneumoniamnist": "Kermany's labels"}, "cc-by-4.0"),
    ({"mimic": 3, "openi": 2}, None, {"mimic": "CheXpert/NegBio", "openi": "MeSH coding"}, "other"),
    ({"montgomery": 2, "shenzhen": 2, "jsrt": 2}, None,
     {"montgomery": "tuberculosis diagnosis", "shenzhen": "tuberculosis diagnosis", "jsrt": "CT"}, "other"),
    ({"kit": 6}, {"csv": {"name": "kit"}}, {"kit": "as given by the manifest's provider"}, "other"),
    ({"csv": 6, "mystery": 1}, None, {"csv": "as given by the manifest's provider", "mystery": "not documented"},
     "other"),
])
def test_reference_standards_follow_the_sources_used(promoted_run, tmp_path, by_source, options, expected, licence):
    from raycxr.card import write_model_card

    write_model_card(_with_sources(promoted_run["card"], by_source, options), tmp_path / "model_card.md")
    loaded = _load_card(tmp_path / "model_card.md")
    lines = dict(_REFERENCE.findall(loaded.text))
    assert sorted(lines) == sorted(by_source)  # one line per source used, no other
    for name, fragment in expected.items():
        assert fragment in lines[name], name
    assert "Kermany" not in " ".join(v for k, v in lines.items() if k not in ("kermany", "pneumoniamnist"))
    assert (loaded.data.license, loaded.data.datasets) == (licence, sorted(by_source))
    assert {e.dataset_type for e in loaded.data.eval_results} == {"+".join(sorted(by_source))}


# Appended to a copy of the report: writes where the title and the ROC figure are laid out, read
# back from --dump-dom. The figures carry width/height, so the layout does not wait on decoding.
_GEOMETRY = """<script>
const box = id => { const r = document.getElementById(id).getBoundingClientRect();
                    return [r.left + scrollX, r.top + scrollY, r.width, r.height]; };
const out = document.createElement("pre"); out.id = "geometry";
out.textContent = JSON.stringify({title: box("title"), roc: box("roc")});
document.body.appendChild(out);
</script>"""


def _chromium(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"  # a fresh profile per run: no state, no lock shared
    done = subprocess.run([str(CHROMIUM), *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _grey(image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=float)


def _smooth(grey: np.ndarray) -> np.ndarray:
    """A 2 px Gaussian blur: the browser places the figure at a fractional pixel and scales it its own
    way, which moves 1 px lines by a pixel; compared unblurred, the same figure correlates only ~0.9."""
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(grey.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)), dtype=float)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_report_renders_in_a_browser_with_its_figures(promoted_run, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (scripts/setup does, as root) to render "
                    "report.html in a real browser")
    from PIL import Image

    model, card = promoted_run["model"], promoted_run["card"]
    report = model / "report.html"
    html = report.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 7 and "<pre>" not in html

    shot = tmp_path / "report.png"
    _chromium(tmp_path, "shot", f"--screenshot={shot}", report.as_uri())
    probe = tmp_path / "report-geometry.html"
    probe.write_text(html.replace("</body>", _GEOMETRY + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "dom", "--dump-dom", probe.as_uri()).stdout

    title = f"Model report: run {card.run}, target {card.target}"
    assert re.search(rf'<h1 id="title">\s*{re.escape(title)}\s*</h1>', dom)
    table = re.search(r'<table id="holdout-metrics">(.*?)</table>', dom, re.S)[1]  # a table, not a JSON dump
    assert re.search(rf"<td>AUC</td>\s*<td[^>]*>{card.holdout['pooled']['auc']:.3f}</td>", table)
    geometry = json.loads(re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S)[1])
    with Image.open(shot) as im:
        page = _grey(im)
    assert page.shape == (2400, 1280)
    assert page.std() > 20, "the screenshot is blank"

    def crop(name: str) -> tuple[np.ndarray, tuple[int, int]]:
        x, y, w, h = (round(v) for v in geometry[name])
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= page.shape[1] and y + h <= page.shape[0], name
        return page[y:y + h, x:x + w], (w, h)

    heading, _ = crop("title")
    assert heading.std() > 20, "the title's box is empty"  # dark text on white
    drawn, size = crop("roc")
    assert size[0] >= 400, "the ROC figure is drawn too small to read"
    assert geometry["roc"][1] < geometry["title"][1] + 1200, "the ROC figure is not near the top of the page"
    with Image.open(model / "roc.png") as im:
        roc = _smooth(_grey(im.convert("RGB").resize(size, Image.Resampling.LANCZOS)))
    with Image.open(model / "pr.png") as im:  # the control: another figure of the same frame and size
        pr = _smooth(_grey(im.convert("RGB").resize(size, Image.Resampling.LANCZOS)))
    drawn = _smooth(drawn)
    match, control = _correlation(drawn, roc), _correlation(drawn, pr)
    assert match > 0.95, f"the ROC <img> box does not show roc.png (correlation {match:.3f})"
    assert match > control + 0.2, f"roc.png {match:.3f} vs pr.png {control:.3f}: the check cannot tell them apart"


def test_search_history_skips_trials_the_time_budget_stopped_before_their_first_report(promoted_run, tmp_path):
    """A --time-budget search leaves trials without a result.json line (their frame is None): the
    report's history plot, drawn after the holdout has been read, drew a TypeError instead."""
    import matplotlib.image

    from raycxr.report import plot_search_history
    from raycxr.runs import run_history

    frames = dict(run_history(promoted_run["run"]).frames)
    assert len(frames) == 2 and all(df is not None for df in frames.values())
    path = plot_search_history({**frames, "no_result": None}, tmp_path / "search_history.png")
    assert matplotlib.image.imread(path).shape[0] > 100


def test_the_report_strips_script_links_a_space_description_smuggles_in(promoted_run, tmp_path):
    """Issue 27: a search space's description is user text in the card; a Markdown link to
    javascript: or data: in it must not survive into report.html as a live link."""
    import dataclasses

    from raycxr.card import write_model_card
    from raycxr.report import _card_html

    card = promoted_run["card"]
    evil = {**card.search_space, "description": "tiny` [click me](javascript:alert(document.cookie)) "
                                                "[img](data:text/html;base64,PHNjcmlwdD4=) [ok](https://example.org) `"}
    write_model_card(dataclasses.replace(card, search_space=evil), tmp_path / "model_card.md")
    assert "](javascript:" in (tmp_path / "model_card.md").read_text()  # the Markdown holds the link ...
    html = _card_html(tmp_path, {})
    assert "click me</a>" in html and "javascript:" not in html and "data:text" not in html  # ... the page not
    assert 'href="https://example.org"' in html and "<script" not in html
