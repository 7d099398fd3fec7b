"""Plots and a self-contained HTML report for a promoted model.

PNG files (matplotlib, Agg): ROC and precision-recall curves with the operating point,
a reliability diagram, the confusion matrix at the threshold, learning curves of the top
trials, the search history (validation AUC by trial start time) and accuracy against CPU cost.
``report.html`` (Jinja2, ``templates/report.html.j2``) embeds them (base64) beside the summary,
the holdout tables and the model card rendered from Markdown, so it can be mailed or archived as
one file.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from raycxr.card import ModelCard, fmt, fmt_ci
from raycxr.metrics import reliability_bins, without_prior_shift


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # keeps long tick labels (the confusion matrix's) whole
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_roc(y, p, threshold: float, auc_ci, path: Path) -> Path:
    from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[0, 1]).ravel()
    fig, ax = _figure()
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, p):.3f} (95% CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([fp / max(1, fp + tn)], [tp / max(1, tp + fn)], s=70, c="crimson", zorder=3,
               label=f"threshold {threshold:.3f}: sens {tp / max(1, tp + fn):.2f}, spec {tn / max(1, tn + fp):.2f}")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC, holdout", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(y, p, threshold: float, path: Path) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    prec, rec, _ = precision_recall_curve(y, p)
    pred = p >= threshold
    fig, ax = _figure()
    ax.plot(rec, prec, lw=2, label=f"average precision {average_precision_score(y, p):.3f}")
    ax.axhline(np.mean(y), ls="--", c="grey", lw=1, label=f"prevalence {np.mean(y):.2f}")
    if pred.any():
        ax.scatter([np.mean(pred[y == 1])], [np.mean(y[pred] == 1)], s=70, c="crimson", zorder=3,
                   label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall, holdout",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_reliability(y, p, ece: float, path: Path, *, bins: int = 10) -> Path:
    from sklearn.calibration import calibration_curve

    from scipy.stats import binomtest

    prob_true, prob_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    # the same bins as calibration_curve's and the ECE's, to put a Wilson 95% CI on each point:
    # a bin of three images says little, and the bar shows it
    ids = reliability_bins(p, bins=bins)
    y = np.asarray(y, dtype=int)
    cis = np.array([binomtest(int(y[ids == b].sum()), int((ids == b).sum())).proportion_ci(method="wilson")
                    for b in np.unique(ids)])
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.errorbar(prob_pred, prob_true, yerr=[prob_true - cis[:, 0], cis[:, 1] - prob_true], marker="o", lw=2,
                capsize=3, label=f"model (ECE {ece:.3f}), 95% CI per bin")
    ax2 = ax.twinx()
    ax2.bar((np.arange(bins) + 0.5) / bins, np.bincount(ids, minlength=bins), width=1 / bins, alpha=0.2,
            color="grey")
    ax2.set_ylabel("images per bin", color="grey")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability, holdout",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_confusion(m: dict, target: str, path: Path) -> Path:
    cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = _figure()
    ax.grid(False)
    ax.imshow(cells, cmap="Blues")
    names = [f"not {target}", target]
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cells[i, j]}\n({cells[i, j] / max(1, cells[i].sum()):.0%} of row)", ha="center",
                    va="center", color="white" if cells[i, j] > cells.max() / 2 else "black", fontsize=11)
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion at threshold {m['threshold']:.3f}, holdout")
    return _save(fig, path)


def plot_learning_curves(frames: dict, top_ids: list[str], path: Path) -> Path:
    fig, ax = _figure()
    for tid in top_ids:
        df = frames.get(tid)
        if df is not None and "val_auc" in df:
            ax.plot(df["epoch"], df["val_auc"], marker="o", label=f"{tid} val AUC")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # one epoch: keep whole-number ticks around it, not 0.945 ... 1.05
        ax.set_xlim(round((lo + hi) / 2) - 1, round((lo + hi) / 2) + 1)
    ax.set(xlabel="epoch", ylabel="validation AUC", title="Learning curves of the top trials")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_search_history(frames: dict, path: Path) -> Path:
    starts, best, order = [], [], []
    for tid, df in frames.items():  # a trial the time budget stopped before its first report has no frame
        if df is not None and "val_auc" in df and df["val_auc"].notna().any():
            order.append((float(df["timestamp"].min()), float(df["val_auc"].max()), tid))
    order.sort()
    fig, ax = _figure()
    if order:
        t0 = order[0][0]
        starts = [(t - t0) / 60 for t, _, _ in order]
        best = np.maximum.accumulate([a for _, a, _ in order])
        ax.scatter(starts, [a for _, a, _ in order], label="trial's best val AUC")
        ax.step(starts, best, where="post", c="crimson", label="best so far")
    ax.set(xlabel="trial start (minutes into the search)", ylabel="validation AUC", title="Search history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (AUC, latency) points no other point beats on both (higher AUC, lower latency)."""
    return [i for i, (a, t) in enumerate(points)
            if not any((a2 >= a and t2 <= t) and (a2 > a or t2 < t) for a2, t2 in points)]


def _plain_log_ticks(ax, decades: float) -> None:
    """Plain numbers on a log x axis (0.25, not 2.5 x 10^-1). Latencies of one search often span
    less than a decade, where matplotlib labels every minor tick in scientific notation, overlapping."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _) -> str:
        lead = round(v / 10 ** np.floor(np.log10(v)), 6)
        return f"{v:.3g}" if decades < 0.7 or (decades < 2 and lead in (2, 5)) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.xaxis.grid(True, which="minor", alpha=0.15)  # a narrow span has no decade (major) line inside it


def plot_pareto(rows: list[dict], chosen: list[str], path: Path, *, int8: dict | None = None,
                latency: dict | None = None) -> Path:
    """Validation AUC against batch-1 ONNX CPU latency for every trial, the Pareto front drawn; with
    an accepted int8 export (``int8``, the card's), the promoted model in fp32 and in int8 as promote
    measured them (validation AUC of each ONNX file; median batch-1 one-thread latency, ``latency``)."""
    rows = [r for r in rows if r.get("latency_ms") is not None and r["latency_ms"] == r["latency_ms"]]
    pts = [(r["val_auc"], r["latency_ms"]) for r in rows]
    front = sorted(pareto_front(pts), key=lambda i: pts[i][1])
    fig, ax = _figure()
    for model in sorted({f"{r['model']}@{r['image_size']}px" for r in rows}):
        sel = [i for i, r in enumerate(rows) if f"{r['model']}@{r['image_size']}px" == model]
        ax.scatter([pts[i][1] for i in sel], [pts[i][0] for i in sel], s=30, label=model, alpha=0.8)
    if front:
        ax.step([pts[i][1] for i in front], [pts[i][0] for i in front], where="post", c="black", lw=1,
                label="Pareto front")
    picked = [i for i, r in enumerate(rows) if r["trial_id"] in chosen]
    if picked:
        ax.scatter([pts[i][1] for i in picked], [pts[i][0] for i in picked], s=140, facecolors="none",
                   edgecolors="crimson", lw=2, label="promoted")
    if int8 and int8.get("accepted") and latency and "int8" in latency:
        served = [(int8["val_auc"][k], next(r["median_ms"] for r in latency[k] if r["batch"] == 1 and r["threads"] == 1))
                  for k in ("fp32", "int8")]
        ax.plot([t for _, t in served], [a for a, _ in served], c="crimson", lw=1, ls=":")
        for (a, t), k, m in zip(served, ("fp32", "int8"), ("s", "D")):
            ax.scatter([t], [a], marker=m, s=60, c="crimson", label=f"promoted, {k} ONNX (promote's median)")
        pts = pts + served
    ax.set_xscale("log")
    if pts:
        _plain_log_ticks(ax, np.log10(max(t for _, t in pts) / min(t for _, t in pts)))
    ax.set(xlabel="batch-1 latency of the ONNX export on CPU, ms (log)", ylabel="validation AUC (best epoch)",
           title="Accuracy against CPU cost, every trial")
    ax.legend(fontsize=7)
    return _save(fig, path)


_CAPTIONS = {  # figure id -> caption
    "roc": "ROC curve, holdout, with the operating point",
    "pr": "Precision-recall curve, holdout",
    "reliability": "Reliability diagram, holdout",
    "confusion": "Confusion matrix at the threshold, holdout",
    "learning_curves": "Learning curves of the top trials (validation AUC by epoch)",
    "search_history": "Search history (validation AUC by trial start)",
    "pareto": "Validation AUC against ONNX CPU latency, every trial",
}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk: the page reserves each figure's box before it decodes."""
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _alt(name: str, card: ModelCard) -> str:
    """What a figure shows, in words, for readers who cannot see it."""
    m, t = card.holdout["pooled"], fmt(card.threshold, 4)
    return {
        "roc": f"ROC curve on the holdout: AUC {fmt(m['auc'])} (95% CI {fmt_ci(m['ci95']['auc'])}); at "
               f"threshold {t} sensitivity {fmt(m['sensitivity'])}, specificity {fmt(m['specificity'])}",
        "pr": "Precision-recall curve on the holdout, with the prevalence as baseline",
        "reliability": "Reliability diagram on the holdout: observed against predicted probability, "
                       f"ECE {fmt(m['ece'])}",
        "confusion": f"Confusion matrix at threshold {t}: TP {m['tp']}, FP {m['fp']}, TN {m['tn']}, FN {m['fn']}",
    }.get(name, _CAPTIONS[name])


def _card_html(out: Path, plots: dict[str, Path]) -> str:
    """model_card.md's body (YAML header dropped) as HTML. Its image links point at figures the page
    already shows, so they become links to those figures; raw HTML in the Markdown (a search space's
    description is user text) is shown as text, never interpreted."""
    import re

    import markdown
    from huggingface_hub import ModelCard

    path = out / "model_card.md"
    if not path.exists():
        return ""
    body = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True).text
    body = re.sub(r"!\[([^\]]*)\]\(([\w.-]+)\.png\)",
                  lambda m: f"[{m[1]} (figure above)](#{m[2]})" if m[2] in plots else m[1], body)
    md = markdown.Markdown(extensions=["tables"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return sanitise(md.convert(body))


# What the card's HTML may hold: Markdown's own output (tables, lists, code, links), nothing that
# runs or loads (no script, style, img or form), and links only to the web, mail or this page.
_TAGS = {"a", "blockquote", "br", "code", "em", "h1", "h2", "h3", "h4", "hr", "li", "ol", "p", "pre", "strong",
         "table", "tbody", "td", "th", "thead", "tr", "ul"}


def sanitise(html: str) -> str:
    """``html`` through an allow-list sanitiser (nh3, the Rust ammonia library): a ``javascript:`` or
    ``data:`` link in user text (a search space's description, say) loses its target."""
    import nh3

    return nh3.clean(html, tags=_TAGS, attributes={"a": {"href", "title"}, "th": {"align"}, "td": {"align"}},
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer")


def write_report(out: Path, *, card: ModelCard, holdout_y, holdout_p, frames: dict,
                 prior_shift: float = 0.0) -> dict[str, Path]:
    """Write every plot as PNG and ``report.html``; return {plot name: path}. ``frames`` are the
    trials' per-epoch results (:func:`raycxr.runs.run_history`), for the learning curves and the
    search history. The page is ``templates/report.html.j2`` rendered with Jinja2 (autoescaped):
    summary, holdout and per-source tables, the figures inline (ROC first) and the model card."""
    pooled = card.holdout["pooled"]
    top = [r["trial_id"] for r in card.leaderboard_top[:5]]
    plots = {
        "roc": plot_roc(holdout_y, holdout_p, card.threshold, pooled["ci95"]["auc"], out / "roc.png"),
        "pr": plot_pr(holdout_y, holdout_p, card.threshold, out / "pr.png"),
        # at the holdout's own prevalence, as the card's ECE (a --prevalence shift is not a miscalibration)
        "reliability": plot_reliability(holdout_y, without_prior_shift(holdout_p, prior_shift), pooled["ece"],
                                        out / "reliability.png"),
        "confusion": plot_confusion(pooled, card.target, out / "confusion.png"),
        "learning_curves": plot_learning_curves(frames, top, out / "learning_curves.png"),
        "search_history": plot_search_history(frames, out / "search_history.png"),
        "pareto": plot_pareto(card.pareto, [m["trial_id"] for m in card.members],
                              out / "pareto.png", int8=card.int8, latency=card.latency),
    }
    _write_page(out, card, plots)
    return plots


def refresh_report(out: Path, card: ModelCard) -> None:
    """Render ``report.html`` again from the card and the plots already in ``out`` (after
    ``raycxr evaluate`` adds an external evaluation to the card)."""
    _write_page(out, card, {name: out / f"{name}.png" for name in _CAPTIONS if (out / f"{name}.png").is_file()})


def _write_page(out: Path, card: ModelCard, plots: dict[str, Path]) -> None:
    """Render ``report.html`` from the card, the written plots and ``model_card.md``."""
    from importlib.resources import files

    import jinja2
    from markupsafe import Markup

    from raycxr.card import HOLDOUT_ROWS, internal_sources, reference_standards

    pooled = card.holdout["pooled"]
    figures = [{"id": name, "caption": _CAPTIONS[name], "alt": _alt(name, card),
                "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"),
                "width": _png_size(path)[0], "height": _png_size(path)[1]} for name, path in plots.items()]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt, ci=fmt_ci)
    template = env.from_string((files("raycxr") / "templates" / "report.html.j2").read_text(encoding="utf-8"))
    page = template.render(
        run=card.run, target=card.target, architecture=card.architecture,
        versions=card.versions, fingerprint=card.data["fingerprint"], sources=internal_sources(card),
        previous_reads=card.holdout_previously_read, selection_rule=card.selection["rule"],
        selection_kind=card.selection["kind"], threshold=card.threshold, threshold_rule=card.threshold_rule,
        threshold_how=card.threshold_stability["how"], pooled=pooled, per_source=card.holdout["per_source"],
        metric_rows=HOLDOUT_ROWS, counts=card.data["counts"], references=reference_standards(card),
        figures=figures, card_html=Markup(_card_html(out, plots)))
    (out / "report.html").write_text(page, encoding="utf-8")
