"""choose(): which trial (or ensemble of trials) promote exports, decided on validation only.

Validation AUC alone saturates on single-hospital data (0.997-0.999 for every good trial of the
Kermany search, on 783 images), so its arg-max picks among models the split cannot tell apart.
The rule here, in this order, is what every model card states:

1. **Finalists**: the ``k`` best trials by validation AUC (their best epoch; ``--finalists``).
2. **Shift AUC**: each finalist scores the validation split as stored and under seven
   acquisition shifts (:data:`raycxr.transforms.ACQUISITION_SHIFTS`: contrast, two tone curves,
   blur, noise, tighter collimation, lower resolution); its selection score is the mean AUC over
   these eight views. A model whose ranking survives another detector's look is more likely to
   survive another hospital's.
3. **Ties**: a finalist is tied with the best when the paired patient-bootstrap 95% interval of
   (best - finalist) shift AUC includes 0 (the same resampled patients score both models).
4. **Ensemble**: with ``ensemble="auto"`` and two or more tied finalists, the mean logit of the
   (up to three) best tied finalists is promoted if its shift AUC gain over the best single
   model has a paired patient-bootstrap 95% interval above 0 (:func:`paired_gain`: the one
   noise rule for every extra cost, test-time augmentation's too). ``"on"`` promotes the ensemble of the (up to three) best finalists, tied or not (as
   ``--tta on`` forces test-time augmentation); ``"off"`` never.
5. **Otherwise the fastest tied finalist** (batch-1 ONNX CPU latency measured in its trial):
   within noise, the cheaper model is preferred. Latencies are measurements too: tied finalists
   within :data:`LATENCY_NOISE` of the fastest (the same architecture at the same size measures
   2.7 and 2.8 ms in two trials) count as equally fast, and the best scored of them is chosen.

``fastest_within=D`` replaces the rule: the quickest trial of the whole search whose validation
AUC is within ``D`` of the best. ``rule="val-auc"`` is the plain arg-max, kept for comparison.
"""

from __future__ import annotations

import math

import numpy as np

from raycxr.errors import ConfigError

SELECTION_RULES = ("auto", "shift-auc", "val-auc", "site")
ENSEMBLE_MODES = ("auto", "on", "off")
MAX_ENSEMBLE = 3
# Batch-1 latencies within this fraction of the fastest tied finalist's count as equal: one
# trial's timing of a model varies by several per cent, and real cost differences (another
# architecture, another input size) are 1.5x and more.
LATENCY_NOISE = 0.2


def views_of(images: np.ndarray, *, size: int | None = None, seed: int = 0,
             batch_size: int = 256) -> dict[str, np.ndarray]:
    """The validation images ("clean") and each acquisition shift of them, as uint8 (N, 1, s, s) at
    ``size`` s, the scored model's own input size (default: as stored).

    Each image is resized to s (antialiased, as the model's preprocessing resizes) and shifted
    there, so blur and noise are defined in the model's own pixels: a 96 px and a 224 px model see
    a similar change (mean absolute change of the input, the bundled films at 224 px: blur 0.82x,
    noise 1.00x; noise made at 224 px and then downsized was 0.30x for the 96 px model, so shift
    AUC favoured small inputs). The lower-resolution source (:data:`FILM_SHIFTS`) halves the
    film's own resolution before the resize instead: halving each model's input would change a
    96 px input 2.7x more than a 224 px one, while the film's half resolution changes them alike
    (0.74x). The model's own equalisation, if any, then runs on the s-px image.
    """
    import torch

    from raycxr.transforms import ACQUISITION_SHIFTS, _resized, acquisition_shift

    size = size or images.shape[-1]
    views = {name: [] for name in ("clean", *ACQUISITION_SHIFTS)}
    for i in range(0, len(images), batch_size):  # bounded memory at any split size
        batch = torch.from_numpy(np.array(images[i:i + batch_size]))
        film = (batch[:, None] if batch.ndim == 3 else batch).float().div_(255.0)
        x = _resized(film, size)
        views["clean"].append(_uint8(x))
        for name in ACQUISITION_SHIFTS:
            shifted = (_resized(acquisition_shift(film.clone(), name, seed=seed + i), size) if name in FILM_SHIFTS
                       else acquisition_shift(x.clone(), name, seed=seed + i))
            views[name].append(_uint8(shifted))
    return {name: np.concatenate(parts) for name, parts in views.items()}


# Shifts made at the film's stored size, before the model's resize (see views_of)
FILM_SHIFTS = ("lowres_0.5",)


def _uint8(x) -> np.ndarray:
    import torch

    return x.mul(255.0).round_().to(torch.uint8).numpy()


def rank_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (..., N) against labels ``y`` (N,), from ranks
    (the Mann-Whitney U statistic; ties count half, as in scikit-learn's roc_auc_score)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    ranks = rankdata(scores, axis=-1)
    return (ranks[..., y].sum(axis=-1) - pos * (pos + 1) / 2) / (pos * neg)


def shift_auc_bootstrap(y: np.ndarray, groups: np.ndarray, logits: np.ndarray, *, n_boot: int = 1000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(point (M,), bootstrap draws (B, M)) of the mean-over-views AUC of ``logits`` (M, V, N).

    Each draw resamples patients once for every model, so differences between models are paired.
    """
    from raycxr.metrics import patient_resamples

    y = np.asarray(y).astype(int)
    point = rank_auc(y, logits).mean(axis=-1)
    draws = [rank_auc(y[idx], logits[..., idx]).mean(axis=-1)
             for idx in patient_resamples(groups, n_boot=n_boot, seed=seed) if 0 < y[idx].sum() < len(idx)]
    return point, np.asarray(draws).reshape(-1, logits.shape[0])


def paired_gain(y: np.ndarray, groups: np.ndarray, base: np.ndarray, candidate: np.ndarray, *, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """The mean-over-views AUC gain of ``candidate`` over ``base`` (logits (V, N) each, or (N,)) with
    its paired patient-bootstrap 95% interval (both scored on the same resampled patients):
    {"gain", "gain_ci95", "kept"}; kept when the interval excludes 0 (lower bound above 0). The
    one noise rule for every extra cost: an ensemble, test-time augmentation (and, with a tolerance,
    int8 serving: :func:`raycxr.serving.int8_rule`)."""
    pair = np.stack([np.atleast_2d(base), np.atleast_2d(candidate)])
    point, draws = shift_auc_bootstrap(y, groups, pair, n_boot=n_boot, seed=seed)
    diff = draws[:, 1] - draws[:, 0] if len(draws) else np.full(1, np.nan)
    lo, hi = (float(np.percentile(diff, q)) for q in (2.5, 97.5))
    return {"base": float(point[0]), "candidate": float(point[1]), "gain": float(point[1] - point[0]),
            "gain_ci95": [lo, hi], "kept": bool(lo > 0), "n_boot_used": int(len(draws))}


def ties(point: np.ndarray, draws: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(indices tied with the best, (2, M) 95% interval of best - each) from paired bootstrap ``draws`` (B, M).

    Tied: the interval of the gap includes 0, i.e. the best is not better in 97.5% of resamples.
    """
    best = int(np.argmax(point))
    if not len(draws):
        return list(range(len(point))), np.zeros((2, len(point)))
    gap = np.percentile(draws[:, [best]] - draws, [2.5, 97.5], axis=0)
    return [i for i in range(len(point)) if i == best or gap[0, i] <= 0], gap


def choose(finalists: list[dict], logits: np.ndarray, y: np.ndarray, groups: np.ndarray, *, ensemble: str = "auto",
           n_boot: int = 1000, seed: int = 0, score: str = "shift AUC") -> dict:
    """Apply the rule (steps 2-5 above) to ``finalists`` (leaderboard rows, best validation AUC
    first, each with ``latency_ms``) whose validation logits under every view are ``logits`` (M, V, N).

    Returns what was chosen (``members``: indices into ``finalists``; ``kind``: single or
    ensemble), why, and every finalist's figures for the model card. ``score`` names the mean-over-
    views AUC in the reasons given (``promote --select site`` passes one view, the site's site-val
    films, and calls it "site-val AUC").
    """
    if ensemble not in ENSEMBLE_MODES:
        raise ConfigError(f"ensemble {ensemble!r} is not one of {ENSEMBLE_MODES}", source="--ensemble")
    point, draws = shift_auc_bootstrap(y, groups, logits, n_boot=n_boot, seed=seed)
    best = int(np.argmax(point))
    tied, (lo, hi) = ties(point, draws)
    ci = np.percentile(draws, [2.5, 97.5], axis=0) if len(draws) else np.full((2, len(point)), np.nan)
    table = [{"trial_id": f["trial_id"], "model": f.get("model"), "image_size": f.get("image_size"),
              "pretrained": f.get("pretrained"), "val_auc": f.get("val_auc"), "latency_ms": f.get("latency_ms"),
              "shift_auc": float(point[i]), "shift_auc_ci95": [float(ci[0, i]), float(ci[1, i])],
              "below_best_ci95": [float(lo[i]), float(hi[i])], "tied_with_best": i in tied}
             for i, f in enumerate(finalists)]
    out = {"rule": "shift-auc", "finalists": table, "n_boot_used": int(len(draws)), "ensemble_mode": ensemble,
           "views": ["clean", *_shift_names()]}

    ranked_tied = sorted(tied, key=lambda i: -point[i])
    # "on" forces an ensemble of the best finalists, tied or not (as --tta on forces TTA)
    pool = sorted(range(len(point)), key=lambda i: -point[i]) if ensemble == "on" else ranked_tied
    not_kept = ""
    if ensemble != "off" and len(pool) >= 2:
        members = pool[:MAX_ENSEMBLE]
        # an ensemble costs its members' latency together: kept (auto) only if its gain over the best
        # single model is clear of noise, by the paired patient bootstrap that decides ties
        g = paired_gain(y, groups, logits[best], logits[members].mean(axis=0), n_boot=n_boot, seed=seed)
        ens_point, (glo, ghi) = g["candidate"], g["gain_ci95"]
        gain = f"a gain of {g['gain']:+.4f} (paired patient bootstrap 95% CI {glo:+.4f} to {ghi:+.4f})"
        out["ensemble"] = {"members": [finalists[i]["trial_id"] for i in members], "shift_auc": ens_point,
                           "best_single_shift_auc": float(point[best]), "gain": g["gain"], "gain_ci95": [glo, ghi],
                           "kept": ensemble == "on" or g["kept"]}
        if ensemble == "on" or g["kept"]:
            why = (f"--ensemble on: the mean logit of the {len(members)} best finalists ({score} {ens_point:.4f}, the "
                   f"best single model {point[best]:.4f})" if ensemble == "on" else
                   f"{len(tied)} finalists tied with the best within the patient bootstrap; the mean logit of "
                   f"{len(members)} of them scored {score} {ens_point:.4f} against the best single model's "
                   f"{point[best]:.4f}, {gain}, which excludes 0")
            out.update(kind="ensemble", members=members, why=why)
            return out
        not_kept = (f"; the ensemble of {len(members)} ({score} {ens_point:.4f}, {gain}) was not kept: its "
                    "interval includes 0, not worth its cost")

    def latency(i):
        return r_latency(finalists[i])

    quick = quickest([latency(i) for i in ranked_tied])
    fastest = ranked_tied[quick[0]]  # ranked_tied is best first: the best scored of the (equally) quickest
    if fastest == best and len(tied) == 1:
        why = f"best {score} {point[best]:.4f}"
    elif fastest == best:
        why = (f"{len(tied)} finalists tied with the best ({score} {point[best]:.4f}) within the patient bootstrap; "
               f"the best of them is also among the fastest ({_ms(latency(best))} batch-1 ONNX on CPU, within "
               f"{LATENCY_NOISE:.0%} of the quickest), so it was chosen")
    else:
        why = (f"{len(tied)} finalists tied with the best ({score} {point[best]:.4f}) within the patient bootstrap; "
               f"the fastest of them was chosen ({_ms(latency(fastest))} batch-1 ONNX on CPU, against "
               f"{_ms(latency(best))} for the best; {score} {point[fastest]:.4f}"
               + (f", the best scored of {len(quick)} within {LATENCY_NOISE:.0%} of the quickest" if len(quick) > 1
                  else "") + ")")
    out.update(kind="single", members=[fastest], why=why + not_kept)
    return out


def quickest(latencies: list[float]) -> list[int]:
    """Positions of the ``latencies`` within :data:`LATENCY_NOISE` of the quickest (all of them when
    none is known), in their order: measurement noise does not rank models."""
    known = [v for v in latencies if v < math.inf]
    if not known:
        return list(range(len(latencies)))
    limit = min(known) * (1 + LATENCY_NOISE)
    return [k for k, v in enumerate(latencies) if v <= limit]


def fastest_within(eligible: list[dict], delta: float) -> tuple[int, str]:
    """(index into ``eligible``, why) of the quickest trial whose validation AUC is within ``delta`` of the best."""
    if delta < 0:
        raise ConfigError(f"{delta} is negative: give an AUC difference >= 0, e.g. 0.005", source="--fastest-within")
    best = max(r["val_auc"] for r in eligible)
    near = [i for i, r in enumerate(eligible) if r["val_auc"] >= best - delta]
    timed = [i for i in near if r_latency(eligible[i]) < math.inf]
    pick = min(timed or near, key=lambda i: (r_latency(eligible[i]), -eligible[i]["val_auc"]))
    return pick, (f"--fastest-within {delta:g}: the quickest of {len(near)} trials with validation AUC >= "
                  f"{best - delta:.4f} ({_ms(r_latency(eligible[pick]))} batch-1 ONNX on CPU)")


def r_latency(row: dict) -> float:
    v = row.get("latency_ms")
    return v if v is not None and not math.isnan(v) else math.inf


def _ms(v: float) -> str:
    return "latency unknown" if v == math.inf else f"{v:.1f} ms"


def _shift_names():
    from raycxr.transforms import ACQUISITION_SHIFTS

    return list(ACQUISITION_SHIFTS)
