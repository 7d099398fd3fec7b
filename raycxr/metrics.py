"""Clinical metrics for a binary classifier: library calls, bootstrap CIs over patients.

Metrics come from scikit-learn (ROC AUC, confusion matrix, Brier score, calibration curve);
this module only chooses the threshold, resamples patients, and lays results out per source.
"""

from __future__ import annotations

import numpy as np

THRESHOLD_RULES = ("youden", "sensitivity", "specificity", "accuracy")
# promote --threshold-rule: auto is "accuracy" (the fewest errors at the site's prevalence) for
# --select site, else "youden"; bayes needs --prevalence
THRESHOLD_CHOICES = ("auto", *THRESHOLD_RULES, "bayes")


def patient_resamples(groups: np.ndarray, *, n_boot: int, seed: int):
    """Yield ``n_boot`` bootstrap index arrays that resample *patients* (``groups``) with replacement.

    Images of one patient are correlated; resampling images would make intervals too narrow.
    Every bootstrap in raycxr (CIs, threshold stability, model selection) draws from here.
    """
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def choose_threshold(y: np.ndarray, p: np.ndarray, *, rule: str = "youden", target: float = 0.95) -> float:
    """An operating threshold from validation data only.

    ``youden``: maximises sensitivity + specificity - 1. ``sensitivity``: the highest threshold
    whose sensitivity reaches ``target``. ``specificity``: the lowest threshold whose specificity
    reaches ``target`` (the most sensitive operating point that keeps false alarms that rare).
    ``accuracy``: the fewest errors at these films' own prevalence (sensitivity weighted by it,
    specificity by its complement): on a deploying site's site-val films, the threshold for its
    mix of patients, where Youden's weighs both classes alike whatever the prevalence.
    """
    from sklearn.metrics import roc_curve

    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {THRESHOLD_RULES}")
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)  # roc_curve's first threshold is +inf
    if rule == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if rule == "accuracy":
        prevalence = float(np.mean(y))
        return float(thr[int(np.argmax(prevalence * tpr + (1 - prevalence) * (1 - fpr)))])
    if rule == "specificity":
        ok = np.flatnonzero(fpr <= 1 - target)
        return float(thr[ok[-1]])
    ok = np.flatnonzero(tpr >= target)
    return float(thr[ok[0]])


IDENTITY_CALIBRATION = {"method": "platt", "scale": 1.0, "bias": 0.0}


def fit_calibration(y: np.ndarray, z: np.ndarray) -> dict:
    """Platt scaling: P = sigmoid(scale * z + bias) on the model's raw logits ``z``, fitted by logistic
    regression on validation (Platt 1999; Guo et al. 2017 call the bias-free case temperature scaling).

    The bias matters here: class weighting (``imbalance: pos_weight``) or label smoothing shift
    every logit, which a temperature alone cannot undo. A light L2 penalty keeps the scale finite
    when validation is (nearly) separable.
    """
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return dict(IDENTITY_CALIBRATION)
    lr = LogisticRegression(C=100.0).fit(np.asarray(z, dtype=float)[:, None], np.asarray(y, dtype=int))
    return {"method": "platt", "scale": float(lr.coef_[0, 0]), "bias": float(lr.intercept_[0])}


def fit_site_calibration(y: np.ndarray, z: np.ndarray, *, internal: dict, min_events: int = 100) -> dict:
    """Platt scaling on a deploying site's own films (site-val), where they are enough.

    With at least ``min_events`` positive and negative films, slope and intercept are fitted on
    the site (:func:`fit_calibration`). With fewer, only the intercept (calibration-in-the-large)
    is refitted on the site and the slope is kept from ``internal`` (the fit on internal
    validation): a slope estimated from few events is itself noisy (Riley et al., BMJ 2024;
    Steyerberg, Clinical Prediction Models, ch. 20, recalibration in the large).
    """
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import log_loss

    y, z = np.asarray(y, dtype=int), np.asarray(z, dtype=float)
    events = int(min((y == 1).sum(), (y == 0).sum()))
    if events >= min_events:
        return {**fit_calibration(y, z), "fitted_on": "site-val", "refit": "slope and intercept",
                "site_events": events}
    scale = float(internal["scale"])

    def loss(bias):
        return log_loss(y, np.clip(calibrate_logits(z, {"scale": scale, "bias": bias}), 1e-12, 1 - 1e-12),
                        labels=[0, 1])

    bias = float(minimize_scalar(loss, bounds=(-50.0, 50.0), method="bounded").x)
    return {"method": "platt", "scale": scale, "bias": bias, "fitted_on": "site-val",
            "refit": f"intercept only (fewer than {min_events} positive or negative site-val films: {events}); "
                     "slope from internal validation", "site_events": events}


def calibrate_logits(z: np.ndarray, calibration: dict) -> np.ndarray:
    """Calibrated probabilities from raw logits: sigmoid(scale * z + bias). The only place a
    calibration is applied in Python (promote, evaluate and predict all call it, on logits; the
    serving ONNX graph, :class:`raycxr.transforms.ServingGraph`, is checked against it)."""
    from scipy.special import expit

    return expit(calibrated_logits(z, calibration))


def calibrated_logits(z: np.ndarray, calibration: dict) -> np.ndarray:
    """scale * z + bias: the calibrated logit, whose sigmoid :func:`calibrate_logits` returns. Rank by
    this where probabilities saturate (a float64 sigmoid is exactly 1.0 past a logit of about 37)."""
    return calibration["scale"] * np.asarray(z, dtype=float) + calibration["bias"]


def prior_shift(calibration: dict, *, fitted_prevalence: float, target_prevalence: float) -> dict:
    """The calibration moved to another prevalence: the bias gains logit(target) - logit(fitted).

    Platt scaling on validation gives probabilities for the validation split's prevalence (the
    training pool's, stratified). Bayes' rule for a label shift (Saerens et al. 2002) changes only
    the prior odds, so ranking, AUC and each threshold's sensitivity and specificity stay as they
    are; the probabilities, PPV and NPV follow the clinic's prevalence.
    """
    from scipy.special import logit

    for name, v in (("fitted", fitted_prevalence), ("target", target_prevalence)):
        if not 0 < v < 1:
            raise ValueError(f"{name} prevalence {v} must be in (0, 1)")
    shift = float(logit(target_prevalence) - logit(fitted_prevalence))
    return {**calibration, "bias": calibration["bias"] + shift,
            "prior_shift": {"fitted_prevalence": float(fitted_prevalence),
                            "target_prevalence": float(target_prevalence), "bias_shift": shift}}


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) at ``prevalence`` from sensitivity and specificity (Bayes' rule)."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return (tp / (tp + fp) if tp + fp else float("nan"), tn / (tn + fn) if tn + fn else float("nan"))


# A threshold whose bootstrap 95% range is wider than this, in logits, is "unstable": the
# validation split cannot pin it down (typical when validation is nearly separable). Judged on the
# logit scale (1.0 is about 0.25 in probability near 0.5), where a --prevalence prior shift moves
# every threshold by the same offset: the decision, and so sensitivity and specificity, do not
# depend on the prevalence given.
UNSTABLE_LOGIT_RANGE = 1.0


def threshold_stability(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, rule: str, target: float = 0.95,
                        n_boot: int = 500, seed: int = 0) -> dict:
    """Bootstrap (over patients) the threshold ``rule`` picks on validation.

    Returns the point threshold, the bootstrap median and 95% range, and whether it is unstable.
    When it is, :func:`choose_operating_threshold` uses the bootstrap median ("bagged"
    threshold), which varies far less between resamples than one arg-max on a noisy curve.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    draws = []
    for idx in patient_resamples(groups, n_boot=n_boot, seed=seed):
        if len(np.unique(y[idx])) == 2:
            draws.append(choose_threshold(y[idx], p[idx], rule=rule, target=target))
    from scipy.special import expit, logit

    draws = np.asarray(draws) if draws else np.array([choose_threshold(y, p, rule=rule, target=target)])
    z = logit(np.clip(draws, 1e-12, 1 - 1e-12))  # the median and range on the logit scale (see above)
    lo, hi = np.percentile(z, [2.5, 97.5])
    return {"point": choose_threshold(y, p, rule=rule, target=target), "bootstrap_median": float(expit(np.median(z))),
            "ci95": [float(expit(lo)), float(expit(hi))], "ci95_logit": [float(lo), float(hi)],
            "unstable": bool(hi - lo > UNSTABLE_LOGIT_RANGE), "n_boot_used": int(len(draws))}


def choose_operating_threshold(y, p, groups, *, rule: str, target: float = 0.95, seed: int = 0,
                               on: str = "validation") -> tuple[float, dict]:
    """The rule's threshold on validation (``on`` names the split: the site's site-val for
    ``--select site``), or the bagged threshold when that is unstable."""
    stab = threshold_stability(y, p, groups, rule=rule, target=target, seed=seed)
    chosen = stab["bootstrap_median"] if stab["unstable"] else stab["point"]
    stab["chosen"] = float(chosen)
    stab["how"] = (f"{rule} on {on}; unstable (95% bootstrap range {stab['ci95'][0]:.3f}-{stab['ci95'][1]:.3f}, "
                   f"wider than {UNSTABLE_LOGIT_RANGE:g} in logits), so the median of {stab['n_boot_used']} "
                   "patient-bootstrap thresholds is used" if stab["unstable"] else
                   f"{rule} on {on} (95% bootstrap range {stab['ci95'][0]:.3f}-{stab['ci95'][1]:.3f})")
    return float(chosen), stab


def reliability_bins(p: np.ndarray, *, bins: int = 10) -> np.ndarray:
    """Each probability's bin among ``bins`` equal-width ones, by scikit-learn's own rule for
    ``calibration_curve(strategy="uniform")`` (an edge belongs to the bin below it), so that counts
    and per-bin intervals line up with its points. The ECE and the reliability plot both bin here."""
    return np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], np.asarray(p, dtype=float))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, bins: int = 10) -> float:
    """ECE over equal-width probability bins: sum over bins of |observed - predicted| x share."""
    from sklearn.calibration import calibration_curve

    prob_true, prob_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    counts = np.bincount(reliability_bins(p, bins=bins), minlength=bins)
    counts = counts[counts > 0]  # calibration_curve drops empty bins too
    return float(np.sum(np.abs(prob_true - prob_pred) * counts) / len(p))


def bias_shift(calibration: dict) -> float:
    """The logit offset a ``--prevalence`` prior shift added to ``calibration`` (0 without one)."""
    return float((calibration.get("prior_shift") or {}).get("bias_shift", 0.0))


def without_prior_shift(p: np.ndarray, shift: float) -> np.ndarray:
    """Probabilities moved back to the prevalence their calibration was fitted at (``shift``: the
    prior shift's logit offset, :func:`bias_shift`): what calibration figures are measured on."""
    from scipy.special import expit, logit

    p = np.asarray(p, dtype=float)
    return p if not shift else expit(logit(np.clip(p, 1e-12, 1 - 1e-12)) - shift)


def binary_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float, prior_shift: float = 0.0) -> dict:
    """Point estimates at ``threshold``; AUC is threshold-free. NaN where a class is absent.

    ``prior_shift``: the logit offset ``--prevalence`` folded into ``p`` (:func:`bias_shift`). The
    threshold's figures are unchanged by it (a monotone shift moves the threshold with the scores);
    Brier and ECE are measured on the probabilities at the split's own prevalence, never on a
    deliberate shift to another one."""
    from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pc = without_prior_shift(p, prior_shift)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold),
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
        "brier": float(brier_score_loss(y, pc, pos_label=1)) if len(y) else float("nan"),
        "ece": expected_calibration_error(y, pc) if both else float("nan"),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece")


def bootstrap_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, threshold: float, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, prior_shift: float = 0.0) -> dict:
    """Percentile CIs for :data:`CI_METRICS`, resampling *patients* (``groups``) with replacement.

    Images of one patient are correlated; resampling images would make the intervals too narrow.
    """
    from raycxr.progress import bar

    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    samples = {m: [] for m in CI_METRICS}
    resamples = patient_resamples(groups, n_boot=n_boot, seed=seed)
    for idx in bar(resamples, total=n_boot, desc="bootstrap", unit="resample", leave=False, show=n_boot >= 200):
        if len(np.unique(y[idx])) < 2:
            continue  # a resample with one class has no AUC; skip it (counted in n_boot_used)
        m = binary_metrics(y[idx], p[idx], threshold=threshold, prior_shift=prior_shift)
        for k in CI_METRICS:
            samples[k].append(m[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, vals in samples.items():
        vals = np.asarray(vals, dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = [float(np.percentile(vals, lo)), float(np.percentile(vals, hi))] if len(vals) else [None, None]
    out["n_boot_used"] = len(samples["auc"])
    return out


def report(y: np.ndarray, p: np.ndarray, *, groups: np.ndarray, sources: np.ndarray, threshold: float,
           n_boot: int = 1000, seed: int = 0, prior_shift: float = 0.0) -> dict:
    """Pooled and per-source metrics, each with patient-level bootstrap 95% CIs (``prior_shift``:
    :func:`binary_metrics`)."""
    kw = {"threshold": threshold, "prior_shift": prior_shift}
    out = {"pooled": {**binary_metrics(y, p, **kw),
                      "ci95": bootstrap_ci(y, p, groups, n_boot=n_boot, seed=seed, **kw)}}
    out["per_source"] = {}
    for s in sorted(set(sources)):
        m = np.asarray(sources) == s
        out["per_source"][s] = {**binary_metrics(y[m], p[m], **kw),
                                "ci95": bootstrap_ci(y[m], p[m], groups[m], n_boot=n_boot, seed=seed, **kw)}
    return out


def operating_points(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, target_sensitivity: float = 0.95,
                     target_specificity: float = 0.95, bayes: bool = False, accuracy: bool = False,
                     seed: int = 0, on: str = "validation") -> dict:
    """Thresholds fixed on validation for each way a clinic may want to operate.

    ``youden`` (balanced), ``sensitivity`` (rule-out: misses at most 1 - target of positives),
    ``specificity`` (rule-in: false alarms on at most 1 - target of negatives), each bootstrapped
    over patients as :func:`choose_operating_threshold` does; with ``bayes`` (probabilities
    corrected to a stated prevalence, see :func:`prior_shift`), also ``bayes``: P >= 0.5, the
    fewest expected errors at that prevalence; with ``accuracy``, also ``accuracy``: the fewest
    errors counted on these films at their own prevalence (a site's site-val).
    """
    targets = {"youden": 0.0, "sensitivity": target_sensitivity, "specificity": target_specificity}
    if accuracy:
        targets["accuracy"] = 0.0
    points = {}
    for rule, target in targets.items():
        threshold, stability = choose_operating_threshold(y, p, groups, rule=rule, target=target, seed=seed, on=on)
        points[rule] = {"threshold": threshold, "target": target if rule in ("sensitivity", "specificity") else None,
                        "how": stability["how"], "stability": stability}
    if bayes:
        points["bayes"] = {"threshold": 0.5, "target": None, "how": "P >= 0.5 at the stated prevalence",
                           "stability": None}
    return points
