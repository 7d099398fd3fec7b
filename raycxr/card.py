"""The model card: what a reader needs to judge a promoted model, in Markdown."""

from __future__ import annotations

from pathlib import Path

_ROWS = [("AUC", "auc"), ("Accuracy", "accuracy"), ("Sensitivity", "sensitivity"), ("Specificity", "specificity"),
         ("PPV", "ppv"), ("NPV", "npv"), ("Brier score", "brier"), ("ECE (10 bins)", "ece")]


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _metric_table(m: dict) -> str:
    lines = ["| metric | value | 95% CI (patient bootstrap) |", "| --- | --- | --- |"]
    ci = m.get("ci95", {})
    for label, key in _ROWS:
        lo, hi = ci.get(key, [None, None])
        lines.append(f"| {label} | {_fmt(m[key])} | {_fmt(lo)} - {_fmt(hi)} |")
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


def write_model_card(card: dict, path: Path) -> None:
    t = card["trial"]
    h = card["holdout"]
    data = card["data"]
    counts = data["counts"]
    hp = {k: t.get(k) for k in ("model", "image_size", "augment", "optimizer", "lr", "weight_decay", "batch_size",
                                "imbalance", "label_smoothing", "warmup_epochs", "drop_rate", "ema_decay", "mixup")}
    warn = ""
    if card["holdout_previously_read"]:
        warn = (f"\n> **Note:** this run's holdout had already been read {card['holdout_previously_read']} time(s) "
                "before this promotion. Figures from repeated holdout reads are optimistic.\n")
    per_source = "\n".join(
        f"| {s} | {m['n']} | {_fmt(m['auc'])} ({_fmt(m['ci95']['auc'][0])} - {_fmt(m['ci95']['auc'][1])}) | "
        f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} |" for s, m in h["per_source"].items())
    text = f"""# Model card: {t['model']} from run `{card['run']}`

Classifier of frontal chest radiographs. Selected and thresholded for **{card['target']}**
(output: P({card['target']})); trained on every known finding of the pooled label list, unknown labels masked.
{warn}
## Intended use and limitations
- Research and model-selection use only; **not a medical device** and not validated for clinical decisions.
- Trained and evaluated only on the sources listed below; performance on other hospitals, scanners,
  populations (e.g. adults when trained on children) or views is unknown and usually lower.
- The holdout is carved from the same sources as training (patient-disjoint), so it estimates
  internal, not external, validity.

## Operating threshold and calibration
{card['threshold']:.4f} on Platt-calibrated probabilities (P = sigmoid({card['calibration']['scale']:.3f} x logit
{card['calibration']['bias']:+.3f}), fitted on validation). Chosen by: {card['threshold_stability']['how']}. Everything here was fixed on the **validation**
split before the holdout was read (validation at this threshold: sensitivity {_fmt(card['validation']['sensitivity'])},
specificity {_fmt(card['validation']['specificity'])}, AUC {_fmt(card['validation']['auc'])}).
{_tta_line(card.get('tta', {}))}

## Holdout metrics ({'read once' if not card['holdout_previously_read'] else 'a repeated read'}, by promote)
![ROC](roc.png) ![Reliability](reliability.png)

{_metric_table(h['pooled'])}

### Per source
| source | images | AUC (95% CI) | sensitivity | specificity |
| --- | --- | --- | --- | --- |
{per_source}

## Data
- Dataset fingerprint `{data['fingerprint']}`; split level: {data['split_level']}.
- Ingest: {data['params']['image_size']} px, resize policy `{data['params']['resize']}`, split seed {data['params']['seed']}.
- Images (patients): train {counts['train']['images']} ({counts['train']['patients']}), val {counts['val']['images']}
  ({counts['val']['patients']}), holdout {counts['holdout']['images']} ({counts['holdout']['patients']}).
- Sources: {', '.join(sorted({s for c in counts.values() for s in c['by_source']}))}. Reference standard (Kermany):
  labels from the dataset's expert graders; not radiologist-adjudicated per image here.

## Selected trial
Trial `{t['trial_id']}`: validation AUC {_fmt(t['val_auc'])} at epoch {t['best_epoch']} of {t['epochs']}.

| hyperparameter | value |
| --- | --- |
""" + "\n".join(f"| {k} | {v} |" for k, v in hp.items()) + f"""

Search space `{card['search_space'].get('description', '').strip() or 'see run.json'}`: see `model_card.json` for
the whole space and the top of the leaderboard.

## Exports
`model.safetensors` (source of truth), `model.torchscript.pt`, `model.onnx`; max |logit difference| against
the eager model on real images: TorchScript {card['export_max_abs_diff']['torchscript']:.1e},
ONNX {card['export_max_abs_diff']['onnx']:.1e}. Preprocessing is in `config.json`.

## Software
""" + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + "\n"
    path.write_text(text)
