"""The model card: what a reader needs to judge a promoted model, in Markdown."""

from __future__ import annotations

from pathlib import Path

from raycxr.config import HYPERPARAMETERS

_ROWS = [("AUC", "auc"), ("Accuracy", "accuracy"), ("Sensitivity", "sensitivity"), ("Specificity", "specificity"),
         ("PPV", "ppv"), ("NPV", "npv"), ("Brier score", "brier"), ("ECE (10 bins)", "ece")]


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _ci(ci) -> str:
    return f"{_fmt(ci[0])} - {_fmt(ci[1])}"


def _ms(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def _metric_table(m: dict) -> str:
    lines = ["| metric | value | 95% CI (patient bootstrap) |", "| --- | --- | --- |"]
    ci = m.get("ci95", {})
    for label, key in _ROWS:
        lines.append(f"| {label} | {_fmt(m[key])} | {_ci(ci.get(key, [None, None]))} |")
    lines.append(f"| images (positive) | {m['n']} ({m['positives']}) | |")
    lines.append(f"| confusion at threshold | TP {m['tp']}, FP {m['fp']}, TN {m['tn']}, FN {m['fn']} | |")
    return "\n".join(lines)


def _tta_line(tta: dict) -> str:
    if "val_auc_with" not in tta:
        return "Test-time augmentation: off."
    views = ", ".join(f"{v['rotation_deg']:+g} deg x{v['scale']:g}" for v in tta["views"])
    return (f"Test-time augmentation: **{'on' if tta['used'] else 'off'}** (`--tta {tta['mode']}`; validation AUC "
            f"{_fmt(tta['val_auc_without'])} without, {_fmt(tta['val_auc_with'])} with the mean logit over views "
            f"{views}).")


def _selection(card: dict) -> str:
    sel = card["selection"]
    lines = [f"Rule `{sel['rule']}`: {sel['why']}."]
    if sel.get("finalists"):
        lines += ["", "Finalists, scored on **validation** as stored and under acquisition shifts "
                      f"({', '.join(sel['views'][1:])}). Shift AUC is the mean AUC over these {len(sel['views'])} "
                      f"views; its CI and each finalist's gap to the best come from a paired patient bootstrap "
                      f"({sel['n_boot_used']} resamples). Tied: the gap's interval includes 0.",
                  "", "| trial | model | px | pretrained | val AUC | shift AUC (95% CI) | below the best (95% CI) | "
                      "tied | ONNX CPU ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {f['trial_id']} | {f['model']} | {f['image_size']} | {f['pretrained']} | {_fmt(f['val_auc'])} | "
                  f"{_fmt(f['shift_auc'])} ({_ci(f['shift_auc_ci95'])}) | {_ci(f['below_best_ci95'])} | "
                  f"{'yes' if f['tied_with_best'] else 'no'} | {_ms(f['latency_ms'])} |" for f in sel["finalists"]]
    if "ensemble" in sel:
        e = sel["ensemble"]
        lines += ["", f"Ensemble of the tied finalists ({' + '.join(e['members'])}, mean logit): shift AUC "
                      f"{_fmt(e['shift_auc'])} against {_fmt(e['best_single_shift_auc'])} for the best single model; "
                      f"{'promoted' if sel['kind'] == 'ensemble' else 'not promoted'} "
                      f"(`--ensemble {sel['ensemble_mode']}`)."]
    return "\n".join(lines)


def _operating_points(card: dict) -> str:
    prev = card.get("prevalence")
    cols = ["operating point", "threshold", "on validation", "holdout sensitivity", "holdout specificity",
            "PPV", "NPV"] + ([f"PPV at {prev:.0%}", f"NPV at {prev:.0%}"] if prev is not None else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, pt in card["operating_points"].items():
        goal = f"target {pt['target']:.2f}: " if pt.get("target") else ""
        cells = [f"{name}{' (exported)' if name == card['threshold_rule'] else ''}", f"{pt['threshold']:.4f}",
                 f"{goal}sens {_fmt(pt['val_sensitivity'])}, spec {_fmt(pt['val_specificity'])}",
                 _fmt(pt["sensitivity"]), _fmt(pt["specificity"]), _fmt(pt["ppv"]), _fmt(pt["npv"])]
        if prev is not None:
            cells += [_fmt(pt["ppv_at_prevalence"]), _fmt(pt["npv_at_prevalence"])]
        lines.append("| " + " | ".join(cells) + " |")
    if prev is not None:
        shift = card["calibration"]["prior_shift"]
        lines += ["", f"Probabilities are corrected from the training pool's prevalence ({shift['fitted_prevalence']:.0%}, "
                      f"as in validation) to the stated {prev:.0%} (`--prevalence`): the calibration bias moved by "
                      f"{shift['bias_shift']:+.3f}. Ranking, sensitivity and specificity do not change with "
                      "prevalence; probabilities, PPV and NPV do."]
    return "\n".join(lines)


def internal_sources(card: dict) -> list[str]:
    return sorted({s for c in card["data"]["counts"].values() for s in c["by_source"]})


def _external(card: dict) -> str:
    internal = card["holdout"]["pooled"]
    ext = card.get("external") or []
    if not ext:
        measured = (" (measured for raycxr's Kermany models: internal holdout AUC 0.998 and accuracy 0.98, but AUC "
                    "0.953 and accuracy 0.84 on Kermany's separately collected official test split; BENCHMARKS.md)"
                    if "kermany" in internal_sources(card) else "")
        return (f"Internal holdouts from one hospital overestimate external performance{measured}. This model has no "
                "external evaluation yet: run `raycxr evaluate --model THIS --data OTHER` on a dataset from elsewhere, "
                "and this section will compare the two.")
    worst = min(ext, key=lambda e: e["auc"] if e["auc"] == e["auc"] else 1.0)
    lines = [f"Internal holdouts from one hospital overestimate external performance: measured for this model, "
             f"holdout AUC {_fmt(internal['auc'])} against {_fmt(worst['auc'])} on {', '.join(worst['sources'])} "
             f"({worst['auc'] - internal['auc']:+.3f}).", "",
             "| data | images (positive) | AUC (95% CI) | accuracy (95% CI) | sensitivity | specificity |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| internal holdout ({', '.join(internal_sources(card))}) | {internal['n']} ({internal['positives']}) | "
             f"{_fmt(internal['auc'])} ({_ci(internal['ci95']['auc'])}) | {_fmt(internal['accuracy'])} "
             f"({_ci(internal['ci95']['accuracy'])}) | {_fmt(internal['sensitivity'])} | "
             f"{_fmt(internal['specificity'])} |"]
    lines += [f"| external: {', '.join(e['sources'])} ({e['split']}, `{e['fingerprint']}`) | {e['n']} "
              f"({e['positives']}) | {_fmt(e['auc'])} ({_ci(e['ci95']['auc'])}) | {_fmt(e['accuracy'])} "
              f"({_ci(e['ci95']['accuracy'])}) | {_fmt(e['sensitivity'])} | {_fmt(e['specificity'])} |" for e in ext]
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


def write_model_card(card: dict, path: Path) -> None:
    t = card["trial"]
    members = card.get("members") or [t]
    h = card["holdout"]
    data = card["data"]
    counts = data["counts"]
    warn = ""
    if card["holdout_previously_read"]:
        warn = (f"\n> **Note:** this run's holdout had already been read {card['holdout_previously_read']} time(s) "
                "before this promotion. Figures from repeated holdout reads are optimistic.\n")
    per_source = "\n".join(
        f"| {s} | {m['n']} | {_fmt(m['auc'])} ({_ci(m['ci95']['auc'])}) | "
        f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} |" for s, m in h["per_source"].items())
    trials = "\n".join(f"Trial `{m['trial_id']}`: validation AUC {_fmt(m['val_auc'])} at epoch {m['best_epoch']} of "
                       f"{m['epochs']}." for m in members)
    hp_rows = "\n".join(f"| {k} | " + " | ".join(str(m.get(k)) for m in members) + " |" for k in HYPERPARAMETERS)
    hp_head = "| hyperparameter | " + " | ".join(m["trial_id"] for m in members) + " |\n|" + " --- |" * (len(members) + 1)
    text = f"""# Model card: {card.get('architecture', t.get('model'))} from run `{card['run']}`

Classifier of frontal chest radiographs. Selected and thresholded for **{card['target']}**
(output: P({card['target']})); trained on every known finding of the pooled label list, unknown labels masked.
{warn}
## Intended use and limitations
- Research and model-selection use only; **not a medical device** and not validated for clinical decisions.
- Trained and evaluated only on the sources listed below; performance on other hospitals, scanners,
  populations (e.g. adults when trained on children) or views is unknown and usually lower.
- The holdout is carved from the same sources as training (patient-disjoint), so it estimates
  internal, not external, validity: see "External validation" below.

## Model selection
{_selection(card)}

## Operating threshold and calibration
{card['threshold']:.4f} on Platt-calibrated probabilities (P = sigmoid({card['calibration']['scale']:.3f} x logit
{card['calibration']['bias']:+.3f}), fitted on validation). Chosen by: {card['threshold_stability']['how']}. Everything here was fixed on the **validation**
split before the holdout was read (validation at this threshold: sensitivity {_fmt(card['validation']['sensitivity'])},
specificity {_fmt(card['validation']['specificity'])}, AUC {_fmt(card['validation']['auc'])}).
{_tta_line(card.get('tta', {}))}

## Holdout metrics ({'read once' if not card['holdout_previously_read'] else 'a repeated read'}, by promote)
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

- Reference standard (Kermany):
  labels from the dataset's expert graders; not radiologist-adjudicated per image here.

## Selected trial{'s (ensemble members)' if len(members) > 1 else ''}
{trials}

{hp_head}
{hp_rows}

Search space `{card['search_space'].get('description', '').strip() or 'see run.json'}`: see `model_card.json` for
the whole space and the top of the leaderboard.

## Exports
`model.safetensors` (source of truth), `model.torchscript.pt`, `model.onnx`; max |logit difference| against
the eager model on real images: TorchScript {card['export_max_abs_diff']['torchscript']:.1e},
ONNX {card['export_max_abs_diff']['onnx']:.1e}. Preprocessing is in `config.json`.

## Software
""" + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + "\n"
    path.write_text(text)
