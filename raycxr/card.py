"""The model card: what a reader needs to judge a promoted model, as data and in Markdown.

:class:`ModelCard` is the one writer and reader of ``model_card.json``: promote fills it; the card,
report, tracking, evaluate and the CLI read its fields. Every section is a field, present in every
card; a section that does not apply (no int8 export, no prevalence, no registry) is ``None``, never a
missing key. ``model_card.md`` is a Hugging Face Hub model card: a YAML header (licence, tags, the sources
used, and a ``model-index`` with the holdout figures and their 95% CIs, written by
``huggingface_hub``'s ``ModelCardData``/``EvalResult`` so ``ModelCard.load`` reads them back)
above the Markdown a person reads. ``report.html`` (:mod:`raycxr.report`) renders the same body.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from raycxr.config import HYPERPARAMETERS
from raycxr.errors import ConfigError

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData


CARD_SCHEMA_VERSION = 2  # 1: the untyped cards before ModelCard (no schema_version key)


@dataclasses.dataclass(kw_only=True)
class ModelCard:
    """A promoted model's record (``model_card.json``). Sections are JSON-shaped dicts as promote
    computed them; optional ones are ``None`` when they do not apply. Paths are relative: ``data.dir``
    to the model folder, the exports to it (no user's home folder goes into a card or MLflow)."""

    run: str                        # the search's name
    trial: dict                     # the first (or only) chosen leaderboard row
    members: list[dict]             # every chosen row (an ensemble's members)
    architecture: str
    selection: dict                 # rule, kind, why, on, finalists, ...
    target: str
    threshold: float
    threshold_rule: str
    threshold_stability: dict
    calibration: dict
    operating_points: dict
    tta: dict
    validation: dict                # on the films that chose (in-sample)
    headline: dict                  # kind "site" (site-test figures) or "none" (a statement)
    holdout: dict
    export_max_abs_diff: dict
    holdout_previously_read: int
    holdout_earlier_reads: list[dict]
    data: dict
    search_space: dict
    versions: dict
    leaderboard_top: list[dict]
    pareto: list[dict]
    external: list[dict]            # raycxr evaluate's results, appended
    latency: dict | None            # ONNX Runtime latency table of the exports
    latency_ms: float | None        # the promoted artefact measured as trials measure theirs
    prevalence: float | None        # --prevalence
    internal_validation: dict | None  # internal validation figures when a site chose
    int8: dict | None               # --quantize int8's decision and figures
    serving_onnx: dict | None       # --serving-onnx's export check
    registry: dict | None           # --register's MLflow model version
    schema_version: int = CARD_SCHEMA_VERSION

    FILE = "model_card.json"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``model_card.json`` whole or not at all (a crash never leaves half a card)."""
        from raycxr.storage import write_atomic

        path = Path(directory) / self.FILE
        write_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n", mode=0o644)
        return path

    @classmethod
    def from_dict(cls, doc: dict, *, source: str = FILE) -> ModelCard:
        """Check a card's keys against this schema: a newer card, an unknown section or a missing
        required one is a ConfigError that says what to do. A card of schema 1 (before this class)
        gets ``None`` for the optional sections it lacks."""
        if not isinstance(doc, dict):
            raise ConfigError(f"{source} is not a model card (a JSON object): promote the run again", source=source)
        version = doc.get("schema_version", 1)
        if not isinstance(version, int) or version > CARD_SCHEMA_VERSION:
            raise ConfigError(f"{source} has card schema {version!r}; this raycxr reads up to {CARD_SCHEMA_VERSION}: "
                              "upgrade raycxr", source=source)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise ConfigError(f"{source} has sections this raycxr does not know ({', '.join(unknown)}): promote the "
                              "run again with this version", source=source)
        optional = {name for name, f in fields.items() if "None" in str(f.type)}
        values = dict(doc)
        if version < CARD_SCHEMA_VERSION:
            values.update({name: None for name in optional if name not in values})
            values.setdefault("external", [])
            values["schema_version"] = CARD_SCHEMA_VERSION
        missing = sorted(set(fields) - set(values) - {"schema_version"})
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}: it was not written by raycxr promote, or was cut "
                              "short; promote the run again", source=source)
        return cls(**values)

    @classmethod
    def load(cls, directory: str | Path) -> ModelCard:
        """Read ``DIR/model_card.json`` (ConfigError when it is missing or unreadable)."""
        path = Path(directory) / cls.FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path} ({type(exc).__name__}): is {directory} a model folder written by "
                              "raycxr promote?", source=str(path)) from None
        return cls.from_dict(doc, source=str(path))

    def data_dir(self, model_dir: str | Path) -> Path | str:
        """The training dataset's folder, as the card records it (relative to the model folder), or its URI."""
        from raycxr.storage import is_uri

        if is_uri(self.data["dir"]):
            return self.data["dir"]
        return (Path(model_dir) / self.data["dir"]).resolve()


class DataSource(NamedTuple):
    name: str
    reference: str         # how the labels were made: what "ground truth" means for this source
    licence: str | None    # a Hugging Face Hub licence id, or None where the terms have none
    terms: str


# By ``raycxr ingest --source`` key (a CSV source may be renamed with ``csv.name``).
SOURCES = {
    "kermany": DataSource(
        "Kermany pediatric chest X-rays (Guangzhou, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2)",
        "graded by two expert physicians, a third expert deciding disagreements (Kermany et al., Cell 2018); "
        "one label per image, not radiologist-adjudicated per image here",
        "cc-by-4.0", "CC BY 4.0, attribute Kermany et al. 2018"),
    "pneumoniamnist": DataSource(
        "PneumoniaMNIST (MedMNIST v2: the Kermany films at 28 px)",
        "Kermany's labels: two expert physicians, a third deciding disagreements",
        "cc-by-4.0", "CC BY 4.0, attribute MedMNIST v2 and Kermany et al. 2018"),
    "nih": DataSource(
        "NIH ChestX-ray14 (NIH Clinical Center)",
        "labels mined from the radiology reports by NLP, not read from the images (about 90% accuracy claimed "
        "by Wang et al., CVPR 2017)",
        None, "NIH Clinical Center terms: use unrestricted, attribution and citation required"),
    "rsna": DataSource(
        "RSNA Pneumonia Detection Challenge 2018 (NIH ChestX-ray14 films)",
        "lung-opacity bounding boxes drawn by radiologists (a subset adjudicated by several readers)",
        None, "the RSNA challenge's terms of use"),
    "mimic": DataSource(
        "MIMIC-CXR (Beth Israel Deaconess Medical Center)",
        "CheXpert/NegBio labelers run on the radiology reports (automated; uncertain mentions per "
        "`mimic.uncertain`)",
        None, "PhysioNet Credentialed Health Data License 1.5.0 (read its data use agreement before sharing "
              "these weights)"),
    "openi": DataSource(
        "Open-I Indiana University chest X-rays", "manual MeSH coding of the radiology reports",
        None, "the Open-I collection's terms of use"),
    "montgomery": DataSource(
        "Montgomery County TB set (NLM)",
        "tuberculosis diagnosis from clinical records and radiologist readings; no pneumonia label",
        None, "the NLM's terms for its TB sets"),
    "shenzhen": DataSource(
        "Shenzhen TB set (NLM)",
        "tuberculosis diagnosis from clinical records and radiologist readings; no pneumonia label",
        None, "the NLM's terms for its TB sets"),
    "jsrt": DataSource(
        "JSRT nodule database",
        "a lung-nodule set: nodules confirmed by CT, diagnoses by pathology or follow-up; no pneumonia label",
        None, "JSRT's terms (registration, research use)"),
    "csv": DataSource("a CSV manifest", "as given by the manifest's provider", None, "the provider's terms"),
}
_UNKNOWN_SOURCE = DataSource("an unregistered source", "not documented", None, "not documented")

# (card key, Hub metric id, name) of the holdout figures in the metadata's model-index
_INDEX_METRICS = (("auc", "roc_auc", "AUC"), ("sensitivity", "recall", "Sensitivity"),
                  ("specificity", "specificity", "Specificity"), ("accuracy", "accuracy", "Accuracy"))
_THRESHOLDED = {"sensitivity", "specificity", "accuracy"}

# (label, key) of the holdout metrics table, here and in report.html
HOLDOUT_ROWS = [("AUC", "auc"), ("Accuracy", "accuracy"), ("Sensitivity", "sensitivity"), ("Specificity", "specificity"),
                ("PPV", "ppv"), ("NPV", "npv"), ("Brier score", "brier"), ("ECE (10 bins)", "ece")]


def fmt(v, digits: int = 3) -> str:
    """A figure for people: ``digits`` decimals, or n/a (None, NaN). The card, report.html and the
    MLflow registry's description all print figures through this and :func:`fmt_ci`."""
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def fmt_ci(ci) -> str:
    """A 95% CI [low, high] as "low - high" (n/a where a bound or the interval is missing)."""
    return f"{fmt(ci[0])} - {fmt(ci[1])}" if ci else "n/a"


def _ms(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def _metric_table(m: dict) -> str:
    lines = ["| metric | value | 95% CI (patient bootstrap) |", "| --- | --- | --- |"]
    ci = m.get("ci95", {})
    for label, key in HOLDOUT_ROWS:
        lines.append(f"| {label} | {fmt(m[key])} | {fmt_ci(ci.get(key, [None, None]))} |")
    lines.append(f"| images (positive) | {m['n']} ({m['positives']}) | |")
    lines.append(f"| confusion at threshold | TP {m['tp']}, FP {m['fp']}, TN {m['tn']}, FN {m['fn']} | |")
    return "\n".join(lines)


def _tta_line(tta: dict) -> str:
    if "val_auc_with" not in tta:
        return "Test-time augmentation: off."
    views = ", ".join(f"{v['rotation_deg']:+g} deg x{v['scale']:g}" for v in tta["views"])
    return (f"Test-time augmentation: **{'on' if tta['used'] else 'off'}** (`--tta {tta['mode']}`; validation AUC "
            f"{fmt(tta['val_auc_without'])} without, {fmt(tta['val_auc_with'])} with the mean logit over views "
            f"{views}" + (f"; the gain's paired patient-bootstrap 95% CI {fmt(tta['gain_ci95'][0], 4)} to "
                          f"{fmt(tta['gain_ci95'][1], 4)}: `auto` keeps TTA only when it lies above 0"
                          if tta.get("gain_ci95") else "") + ").")


def _selection(card: ModelCard) -> str:
    sel = card.selection
    lines = [f"Rule `{sel['rule']}`: {sel['why']}."]
    score = "site-val AUC" if sel["rule"] == "site" else "shift AUC"
    if sel.get("finalists") and sel["rule"] == "site":
        lines += ["", "Finalists: the trials with the best AUC on the deploying site's **site-val** films (their "
                      "kept epoch), each scored again on site-val; the CI and each finalist's gap to the best come "
                      f"from a paired patient bootstrap ({sel['n_boot_used']} resamples). Tied: the gap's interval "
                      "includes 0. Site-val chose, so figures on it are optimistic; site-test did not.",
                  "", f"| trial | model | px | pretrained | val AUC | {score} (95% CI) | below the best (95% CI) | "
                      "tied | ONNX CPU ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    elif sel.get("finalists"):
        lines += ["", "Finalists, scored on **validation** as stored and under acquisition shifts "
                      f"({', '.join(sel['views'][1:])}). Shift AUC is the mean AUC over these {len(sel['views'])} "
                      f"views; its CI and each finalist's gap to the best come from a paired patient bootstrap "
                      f"({sel['n_boot_used']} resamples). Tied: the gap's interval includes 0.",
                  "", "| trial | model | px | pretrained | val AUC | shift AUC (95% CI) | below the best (95% CI) | "
                      "tied | ONNX CPU ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {f['trial_id']} | {f['model']} | {f['image_size']} | {f['pretrained']} | {fmt(f['val_auc'])} | "
                  f"{fmt(f['shift_auc'])} ({fmt_ci(f['shift_auc_ci95'])}) | {fmt_ci(f['below_best_ci95'])} | "
                  f"{'yes' if f['tied_with_best'] else 'no'} | {_ms(f['latency_ms'])} |" for f in sel["finalists"]]
    if "ensemble" in sel:
        e = sel["ensemble"]
        which = "the best finalists, forced" if sel["ensemble_mode"] == "on" else "the tied finalists"
        lines += ["", f"Ensemble of {which} ({' + '.join(e['members'])}, mean logit): {score} "
                      f"{fmt(e['shift_auc'])} against {fmt(e['best_single_shift_auc'])} for the best single model; "
                      f"{'promoted' if sel['kind'] == 'ensemble' else 'not promoted'} "
                      f"(`--ensemble {sel['ensemble_mode']}`)."]
    return "\n".join(lines)


def _headline(card: ModelCard) -> str:
    """The figure that counts: the deploying site's site-test films (read once), or a plain
    statement that none exists."""
    h = card.headline
    if h["kind"] != "site":
        return h["statement"]
    m = h["metrics"]["pooled"]
    sites = h["sites"]
    described = "; ".join(
        f"`{s['name']}`: site-test {s['counts']['site-test']['images']} films of "
        f"{s['counts']['site-test']['patients']} patients ({s['counts']['site-test']['positives']} positive), "
        f"site-val {s['counts']['site-val']['images']} films (seed {s['seed']}, test fraction {s['test_fraction']:g})"
        for s in sites)
    read = ("read once, by this promotion" if not h["previously_read"] else
            f"read again after {h['previously_read']} earlier read(s): optimistic")
    small = [s["name"] for s in sites if min(s["counts"]["site-test"]["positives"],
                                             s["counts"]["site-test"]["negatives"]) < 100]
    warn = (f"\n> **Few films:** site-test of {', '.join(small)} holds fewer than 100 positive or 100 negative films; "
            "the intervals are wide (Riley et al., BMJ 2024).\n" if small else "")
    per_site = ""
    if len(h["metrics"]["per_source"]) > 1:
        per_site = "\n\n| site | films | AUC (95% CI) | sensitivity | specificity |\n| --- | --- | --- | --- | --- |\n" + \
            "\n".join(f"| {name} | {x['n']} | {fmt(x['auc'])} ({fmt_ci(x['ci95']['auc'])}) | {fmt(x['sensitivity'])} | "
                      f"{fmt(x['specificity'])} |" for name, x in h["metrics"]["per_source"].items())
    points = "\n".join(f"| {name}{' (exported)' if name == card.threshold_rule else ''} | {pt['threshold']:.4f} | "
                       f"{fmt(pt['sensitivity'])} | {fmt(pt['specificity'])} | {fmt(pt['accuracy'])} |"
                       for name, pt in h["operating_points"].items())
    return f"""The deploying site's own films, kept apart from everything that was chosen ({read}). The model,
its epoch, calibration and threshold were chosen on the site's site-val films and the internal validation split;
site-test was read once, after all of that. {described}.
{warn}
{_metric_table(m)}{per_site}

| operating point | threshold | site-test sensitivity | site-test specificity | site-test accuracy |
| --- | --- | --- | --- | --- |
{points}"""


def _operating_points(card: ModelCard) -> str:
    prev = card.prevalence
    cols = ["operating point", "threshold", f"on {card.selection['on']}", "holdout sensitivity",
            "holdout specificity",
            "PPV", "NPV"] + ([f"PPV at {prev:.0%}", f"NPV at {prev:.0%}"] if prev is not None else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, pt in card.operating_points.items():
        goal = f"target {pt['target']:.2f}: " if pt.get("target") else ""
        cells = [f"{name}{' (exported)' if name == card.threshold_rule else ''}", f"{pt['threshold']:.4f}",
                 f"{goal}sens {fmt(pt['val_sensitivity'])}, spec {fmt(pt['val_specificity'])}",
                 fmt(pt["sensitivity"]), fmt(pt["specificity"]), fmt(pt["ppv"]), fmt(pt["npv"])]
        if prev is not None:
            cells += [fmt(pt["ppv_at_prevalence"]), fmt(pt["npv_at_prevalence"])]
        lines.append("| " + " | ".join(cells) + " |")
    if prev is not None:
        shift = card.calibration["prior_shift"]
        lines += ["", f"Probabilities are corrected from the training pool's prevalence ({shift['fitted_prevalence']:.0%}, "
                      f"as in validation) to the stated {prev:.0%} (`--prevalence`): the calibration bias moved by "
                      f"{shift['bias_shift']:+.3f}. Ranking, sensitivity and specificity do not change with "
                      "prevalence; probabilities, PPV and NPV do."]
    return "\n".join(lines)


def internal_sources(card: ModelCard) -> list[str]:
    return sorted({s for c in card.data["counts"].values() for s in c["by_source"]})


def _source_info(card: ModelCard, name: str) -> DataSource:
    """SOURCES' entry for a source as named in the shards (a CSV source may be renamed: ``csv.name``)."""
    csv_name = card.data["params"].get("source_options", {}).get("csv", {}).get("name", "csv")
    return SOURCES.get("csv" if name == csv_name else name, _UNKNOWN_SOURCE)


def reference_standards(card: ModelCard) -> dict[str, str]:
    """{source: how its labels were made} for every source the model was trained and evaluated on."""
    return {name: _source_info(card, name).reference for name in internal_sources(card)}


def _licence(card: ModelCard) -> tuple[str, str]:
    """(Hub licence id, a Markdown sub-list of each source's terms). The weights derive from the
    training images, so their terms apply; raycxr's own Apache-2.0 covers only the code."""
    infos = [(name, _source_info(card, name)) for name in internal_sources(card)]
    ids = {info.licence for _, info in infos}
    terms = "\n".join(f"    - {name}, {info.name}: {info.terms}." for name, info in infos)
    return (ids.pop() if len(ids) == 1 and None not in ids else "other"), terms


def card_metadata(card: ModelCard) -> ModelCardData:
    """The card's YAML header as ``huggingface_hub.ModelCardData``: the holdout figures (and every
    external evaluation) in ``model-index``.

    ``EvalResult`` has no field for an interval, so each 95% CI is two more metrics of their own
    type (``roc_auc_ci95_lower``, ``roc_auc_ci95_upper``) whose ``args`` say how it was computed;
    thresholded metrics carry the threshold in theirs.
    """
    from huggingface_hub import EvalResult, ModelCardData

    target = card.target
    threshold = {"threshold": card.threshold, "threshold_rule": card.threshold_rule}

    def results(m: dict, ci: dict, *, sources: list[str], split: str, fingerprint: str, name: str) -> list:
        where = dict(task_type="image-classification", task_name=f"{target} classification (binary)",
                     dataset_type="+".join(sources), dataset_name=name, dataset_split=split,
                     dataset_revision=fingerprint)
        boot = {"ci": "95% percentile, patient-level bootstrap",
                **({"n_boot": ci["n_boot_used"]} if "n_boot_used" in ci else {})}
        out = []
        for key, metric, label in _INDEX_METRICS:
            args = threshold if key in _THRESHOLDED else None
            figures = [(metric, label, m.get(key), args)]
            if key in ci:
                figures += [(f"{metric}_ci95_{end}", f"{label} 95% CI {end} bound", ci[key][i],
                             {**(args or {}), **boot}) for i, end in enumerate(("lower", "upper"))]
            out += [EvalResult(**where, metric_type=t, metric_name=n, metric_value=float(v), metric_args=a)
                    for t, n, v, a in figures if v is not None and v == v]  # no NaN/None into YAML
        return out

    pooled, sources = card.holdout["pooled"], internal_sources(card)
    evals = results(pooled, pooled.get("ci95", {}), sources=sources, split="holdout",
                    fingerprint=card.data["fingerprint"],
                    name=f"internal holdout ({', '.join(sources)})")
    for e in card.external:
        evals += results(e, e.get("ci95", {}), sources=e["sources"], split=e["split"], fingerprint=e["fingerprint"],
                         name=f"external: {', '.join(e['sources'])} ({e['split']})")
    licence = _licence(card)[0]
    return ModelCardData(
        model_name=card.run, eval_results=evals or None, license=licence,
        license_name="training-data-terms" if licence == "other" else None,  # spelled out in the body
        # the raycxr source keys: most of these datasets have no canonical Hugging Face Hub id
        datasets=sources, library_name="raycxr", pipeline_tag="image-classification",
        tags=["medical-imaging", "chest-x-ray", target.replace("_", "-"), "image-classification", "timm", "raycxr"],
        metrics=[metric for _, metric, _ in _INDEX_METRICS])


def _external(card: ModelCard) -> str:
    internal = card.holdout["pooled"]
    ext = card.external
    if not ext:
        measured = (" (measured for raycxr's Kermany models: internal holdout AUC 0.998 and accuracy 0.98, but AUC "
                    "0.953 and accuracy 0.84 on Kermany's separately collected official test split; BENCHMARKS.md)"
                    if "kermany" in internal_sources(card) else "")
        return (f"Internal holdouts from one hospital overestimate external performance{measured}. This model has no "
                "external evaluation yet: run `raycxr evaluate --model THIS --data OTHER` on a dataset from elsewhere, "
                "and this section will compare the two.")
    def kind(e: dict) -> str:  # external only when checked disjoint from the training and validation films
        o = e.get("overlap") or {"checked": False, "verdict": "overlap with the training data not checked"}
        return "external" if o["checked"] and not o["images"] else o["verdict"].split(":")[0]

    disjoint = [e for e in ext if kind(e) == "external"]
    worst = min(disjoint, key=lambda e: e["auc"] if e["auc"] == e["auc"] else 1.0) if disjoint else None
    lines = [f"Internal holdouts from one hospital overestimate external performance: measured for this model, "
             f"holdout AUC {fmt(internal['auc'])} against {fmt(worst['auc'])} on {', '.join(worst['sources'])} "
             f"({worst['auc'] - internal['auc']:+.3f})." if worst else
             "No evaluation below is external: each shares films with the model's training or validation data, or "
             "could not be checked for it, so none measures performance elsewhere.", "",
             "| data | images (positive) | AUC (95% CI) | accuracy (95% CI) | sensitivity | specificity |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| internal holdout ({', '.join(internal_sources(card))}) | {internal['n']} ({internal['positives']}) | "
             f"{fmt(internal['auc'])} ({fmt_ci(internal['ci95']['auc'])}) | {fmt(internal['accuracy'])} "
             f"({fmt_ci(internal['ci95']['accuracy'])}) | {fmt(internal['sensitivity'])} | "
             f"{fmt(internal['specificity'])} |"]
    lines += [f"| {kind(e)}: {', '.join(e['sources'])} ({e['split']}, `{e['fingerprint']}`) | {e['n']} "
              f"({e['positives']}) | {fmt(e['auc'])} ({fmt_ci(e['ci95']['auc'])}) | {fmt(e['accuracy'])} "
              f"({fmt_ci(e['ci95']['accuracy'])}) | {fmt(e['sensitivity'])} | {fmt(e['specificity'])} |" for e in ext]
    lines += ["", "External rows use this model's own calibration and exported threshold, fixed on internal validation."]
    return "\n".join(lines)


def _per_source_splits(counts: dict) -> str:
    sources = sorted({s for c in counts.values() for s in c["by_source"]})
    lines = ["| source | train | val | holdout |", "| --- | --- | --- | --- |"]
    for src in sources:
        cells = [f"{c['by_source'].get(src, 0)} ({c.get('patients_by_source', {}).get(src, '?')})"
                 for c in (counts[s] for s in ("train", "val", "holdout"))]
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _serving_line(card: ModelCard) -> str:
    s = card.serving_onnx
    if not s:
        return ""
    return (f"\n`model.serving.onnx` (`--serving-onnx`): {s['input']} in, calibrated {s['output']} out, with the "
            f"resize, normalisation, test-time augmentation and calibration inside; max |difference| from "
            f"`raycxr.Model.predict_proba` on validation images {s['max_abs_diff']:.1e}.")


def _cpu_serving(card: ModelCard) -> str:
    """The exports' CPU latency (ONNX Runtime, median of 30 after warm-up) and the int8 decision."""
    table = card.latency
    if not table:
        return ""
    lines = ["\n## Serving on a CPU\n", "Latency of the ONNX exports under ONNX Runtime (graph optimisations on) on the "
             "promoting machine's CPU, median of 30 runs after warm-up:\n",
             "| model | batch | threads | ms per batch | ms per image |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['batch']} | {r['threads']} | {r['median_ms']:.2f} | {r['per_image_ms']:.2f} |"
              for name, rows in table.items() for r in rows]
    trial = ", ".join(f"{m['trial_id']} {_ms(m.get('latency_ms'))} ms" for m in card.members)
    lines.append(f"\nThe promoted model itself{' (ensemble)' if len(card.members) > 1 else ''}"
                 f"{' with test-time augmentation' if card.tta['used'] else ''}, measured as trials measure theirs "
                 f"(batch 1, one thread, the minimum of 30): {_ms(card.latency_ms)} ms; its trial(s) "
                 f"reported {trial}.")
    q = card.int8
    if q:
        lines.append(f"\nint8 (`--quantize int8`, {q['format']}, activation ranges from {q['calibration_films']} "
                     f"{q['on']} films): {q['why']} (paired patient bootstrap, {q['n_boot_used']} resamples).")
        if "holdout" in q:
            lines += ["", "| holdout | AUC (95% CI) | accuracy | sensitivity | specificity |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {name} (`{'model.onnx' if name == 'fp32' else q['file']}`) | {fmt(m['auc'])} "
                      f"({fmt_ci(m['auc_ci95'])}) | {fmt(m['accuracy'])} | {fmt(m['sensitivity'])} | "
                      f"{fmt(m['specificity'])} |" for name, m in q["holdout"].items()]
    return "\n".join(lines) + "\n"


def write_model_card(card: ModelCard, path: Path) -> None:
    """Write ``model_card.md``: the YAML header of :func:`card_metadata` above :func:`card_body`."""
    from huggingface_hub import ModelCard

    # parsed back before saving: a header ModelCard.load cannot read fails here, not on the Hub
    ModelCard(f"---\n{card_metadata(card).to_yaml()}\n---\n\n{card_body(card)}").save(path)


def _calibrated_on(card: ModelCard) -> str:
    cal = card.calibration
    if cal.get("fitted_on") == "site-val":
        return f"the site's site-val films: {cal['refit']}"
    return "validation"


def card_body(card: ModelCard) -> str:
    """The model card's Markdown, without its YAML header."""
    members = card.members
    h = card.holdout
    data = card.data
    counts = data["counts"]
    warn = ""
    if card.holdout_previously_read:
        earlier = "; ".join(f"{e.get('time')} by {e.get('by') or 'promote'}"
                            + (f" (run {e['run']})" if e.get("run") else "") for e in card.holdout_earlier_reads)
        warn = (f"\n> **Note:** these holdout films had already been read {card.holdout_previously_read} time(s) "
                f"before this promotion{': ' + earlier if earlier else ''}. Figures from repeated holdout reads are "
                "optimistic.\n")
    per_source = "\n".join(
        f"| {s} | {m['n']} | {fmt(m['auc'])} ({fmt_ci(m['ci95']['auc'])}) | "
        f"{fmt(m['sensitivity'])} | {fmt(m['specificity'])} |" for s, m in h["per_source"].items())
    trials = "\n".join(f"Trial `{m['trial_id']}`: validation AUC {fmt(m['val_auc'])} at epoch {m['best_epoch']} of "
                       f"{m['epochs']}." for m in members)
    hp_rows = "\n".join(f"| {k} | " + " | ".join(str(m.get(k)) for m in members) + " |" for k in HYPERPARAMETERS)
    hp_head = "| hyperparameter | " + " | ".join(m["trial_id"] for m in members) + " |\n|" + " --- |" * (len(members) + 1)
    references = "\n".join(f"- Reference standard ({src}): {how}." for src, how in reference_standards(card).items())
    return f"""# Model card: {card.architecture} from run `{card.run}`

Classifier of frontal chest radiographs. Selected and thresholded for **{card.target}**
(output: P({card.target})); trained on every known finding of the pooled label list, unknown labels masked.
{warn}
## Headline: {'the deploying site (site-test)' if card.headline['kind'] == 'site' else 'no site figure'}
{_headline(card)}

## Intended use and limitations
- Research and model-selection use only; **not a medical device** and not validated for clinical decisions.
- Trained and evaluated only on the sources listed below; performance on other hospitals, scanners,
  populations (e.g. adults when trained on children) or views is unknown and usually lower.
- The holdout is carved from the same sources as training (patient-disjoint), so it estimates
  internal, not external, validity: see "External validation" below.

## Model selection
{_selection(card)}

## Operating threshold and calibration
{card.threshold:.4f} on Platt-calibrated probabilities (P = sigmoid({card.calibration['scale']:.3f} x logit
{card.calibration['bias']:+.3f}), fitted on {_calibrated_on(card)}). Chosen by: {card.threshold_stability['how']}. Everything here was fixed on the **{card.selection['on']}**
films before the holdout was read ({card.selection['on']} at this threshold, in-sample: sensitivity {fmt(card.validation['sensitivity'])},
specificity {fmt(card.validation['specificity'])}, AUC {fmt(card.validation['auc'])}).
{_tta_line(card.tta)}

## Holdout metrics ({'read once' if not card.holdout_previously_read else 'a repeated read'}, by promote)
![ROC](roc.png) ![Reliability](reliability.png)

{_metric_table(h['pooled'])}

### Operating points
Every threshold below was fixed on validation; the holdout columns are what it gave there.

{_operating_points(card)}

### Per source
| source | images | AUC (95% CI) | sensitivity | specificity |
| --- | --- | --- | --- | --- |
{per_source}

## External validation
{_external(card)}

## Data
- Dataset fingerprint `{data['fingerprint']}`; split level: {data['split_level']}.
- Ingest: {data['params']['image_size']} px, resize policy `{data['params']['resize']}`, split seed {data['params']['seed']}.
- Images (patients): train {counts['train']['images']} ({counts['train']['patients']}), val {counts['val']['images']}
  ({counts['val']['patients']}), holdout {counts['holdout']['images']} ({counts['holdout']['patients']}).
- Sources: {', '.join(internal_sources(card))}; images (patients) per source and split:

{_per_source_splits(counts)}

{references}
- Licence: the weights derive from the training images, whose terms apply (raycxr's own code is Apache-2.0):
{_licence(card)[1]}

## Selected trial{'s (ensemble members)' if len(members) > 1 else ''}
{trials}

{hp_head}
{hp_rows}

Search space `{card.search_space.get('description', '').strip() or 'see run.json'}`: see `model_card.json` for
the whole space and the top of the leaderboard.

## Exports
`model.safetensors` (source of truth), `model.torchscript.pt`, `model.onnx`; max |logit difference| against
the eager model on real images: TorchScript {card.export_max_abs_diff['torchscript']:.1e},
ONNX {card.export_max_abs_diff['onnx']:.1e}. Preprocessing is in `config.json`.{_serving_line(card)}
{_cpu_serving(card)}
## Software
""" + ", ".join(f"{k} {v}" for k, v in card.versions.items()) + "\n"


def format_metrics(m: dict) -> str:
    """A split's pooled figures with their 95% CIs, one line each (the console's table)."""
    lines = []
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece"):
        lo, hi = m["ci95"][k]
        span = f"95% CI {lo:.3f} - {hi:.3f}" if lo is not None else "95% CI n/a"
        lines.append(f"  {k:12s} {m[k]:.3f}  {span}")
    return "\n".join(lines)


def format_serving(card: ModelCard) -> list[str]:
    """The int8 decision and the exports' CPU latency table, as console lines."""
    from raycxr.serving import format_latency

    lines = []
    if q := card.int8:
        lines.append(f"int8 ONNX: {q['why']}")
        lines += [f"  {name} holdout AUC {m['auc']:.4f} (95% CI {m['auc_ci95'][0]:.4f} - {m['auc_ci95'][1]:.4f})"
                  for name, m in q.get("holdout", {}).items()]
    if card.latency:
        lines += ["CPU latency (ONNX Runtime, median of 30 after warm-up):", format_latency(card.latency)]
    return lines


def format_promotion(card: ModelCard, out: str | Path) -> str:
    """What ``raycxr promote`` prints: the choice, the threshold, the headline, the holdout, the
    operating points and the serving figures of the card written to ``out``."""
    h, on = card.holdout["pooled"], card.selection["on"]
    ids = ", ".join(f"{r['trial_id']} (val AUC {r['val_auc']:.4f})" for r in card.members)
    lines = [f"Promoted {card.architecture}: trial {ids} -> {out}",
             f"Selection ({card.selection['rule']}): {card.selection['why']}"]
    score = "site-val AUC" if card.selection["rule"] == "site" else "shift AUC"  # what the finalists were ranked by
    for f in card.selection.get("finalists", []):
        lines.append(f"  finalist {f['trial_id']} {f['model']}@{f['image_size']}px: val AUC {f['val_auc']:.4f}, "
                     f"{score} {f['shift_auc']:.4f}{' (tied with the best)' if f['tied_with_best'] else ''}, "
                     f"{'n/a' if f['latency_ms'] is None else format(f['latency_ms'], '.1f')} ms")
    lines.append(f"Threshold {card.threshold:.4f} (rule {card.threshold_rule}, chosen on {on})")
    if "val_auc_with" in (tta := card.tta):
        lines.append(f"Test-time augmentation {'on' if tta['used'] else 'off'} ({on} AUC "
                     f"{tta['val_auc_without']:.4f} without, {tta['val_auc_with']:.4f} with; --tta {tta['mode']})")
    headline = card.headline
    if headline["kind"] == "site":
        m, again = headline["metrics"]["pooled"], headline["previously_read"]
        names = ", ".join(s["name"] for s in headline["sites"])
        lines += [f"Site-test of {names} ({m['n']} films, {m['positives']} positive; "
                  f"{'read once' if not again else f'read again after {again} earlier read(s): optimistic'}), "
                  "the headline:", format_metrics(m)]
    else:
        lines.append(headline["statement"])
    prior = card.holdout_previously_read
    how = "read once" if not prior else f"read again after {prior} earlier read(s): optimistic, see the card"
    lines += [f"Internal holdout ({h['n']} images, {how}):", format_metrics(h),
              "Operating points (thresholds fixed on validation; holdout sensitivity / specificity):"]
    lines += [f"  {name:12s} threshold {pt['threshold']:.4f}: {pt['sensitivity']:.3f} / {pt['specificity']:.3f}"
              for name, pt in card.operating_points.items()]
    lines += format_serving(card)
    lines.append(f"Model card: {Path(out) / 'model_card.md'}   Report with plots: {Path(out) / 'report.html'}")
    if r := card.registry:
        lines.append(f"Registered {r['model_name']} version {r['version']} ({r['model_uri']}) at {r['tracking_uri']}")
    return "\n".join(lines)
