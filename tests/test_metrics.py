import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from raycxr.metrics import binary_metrics, bootstrap_ci, choose_threshold, expected_calibration_error, report


def _scores(n, seed=0, sep=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = rng.normal(0, 1, n) + sep * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logits))


def test_metrics_at_threshold_match_confusion_counts():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.7, 0.2, 0.6, 0.8, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 2, 1)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(3 / 4) and m["npv"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))


@pytest.mark.parametrize("rule, check", [
    ("youden", lambda m: m["sensitivity"] + m["specificity"] > 1.5),
    ("sensitivity", lambda m: m["sensitivity"] >= 0.95),
])
def test_threshold_rules(rule, check):
    y, p = _scores(2000)
    t = choose_threshold(y, p, rule=rule, target=0.95)
    assert 0 < t < 1 and check(binary_metrics(y, p, threshold=t))


def test_accuracy_rule_makes_the_fewest_errors_at_the_films_own_prevalence():
    """At 80% positives the fewest-errors threshold sits below Youden's (a missed positive is four
    times as common as a false alarm), makes no more errors than any other threshold on these
    films, and moves when the same scores come at another prevalence."""
    rng = np.random.default_rng(4)
    y = (rng.random(3000) < 0.8).astype(int)
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.2, 3000))))
    acc, youden = (choose_threshold(y, p, rule=r) for r in ("accuracy", "youden"))
    errors = lambda t: int(((p >= t) != y).sum())  # noqa: E731
    assert acc < youden and errors(acc) < errors(youden)
    assert errors(acc) == min(errors(t) for t in np.unique(p))
    rare = np.concatenate([np.flatnonzero(y == 1)[:300], np.flatnonzero(y == 0)])  # now 30% positives
    assert choose_threshold(y[rare], p[rare], rule="accuracy") > youden


def test_ci_contains_estimate_and_shrinks_with_more_patients():
    widths = []
    for n in (100, 1600):
        y, p = _scores(n, seed=n)
        groups = np.arange(n) // 2  # two images per patient
        m = binary_metrics(y, p, threshold=0.5)
        ci = bootstrap_ci(y, p, groups, threshold=0.5, n_boot=400, seed=0)
        for k in ("auc", "accuracy", "sensitivity", "specificity"):
            assert ci[k][0] <= m[k] <= ci[k][1], (k, ci[k], m[k])
        widths.append(ci["auc"][1] - ci["auc"][0])
    assert widths[1] < widths[0] / 2  # 16x the patients: about 4x narrower


def test_per_source_rows_add_up_to_pooled():
    y, p = _scores(600)
    sources = np.where(np.arange(600) % 3 == 0, "nih", "kermany")
    r = report(y, p, groups=np.arange(600), sources=sources, threshold=0.5, n_boot=50)
    assert sum(m["n"] for m in r["per_source"].values()) == r["pooled"]["n"] == 600
    for k in ("tp", "fp", "tn", "fn"):
        assert sum(m[k] for m in r["per_source"].values()) == r["pooled"][k]


def test_ece_is_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.where(p > 0.5, 0.999, 0.001)) > 0.2


def test_ece_weighs_each_bin_by_the_images_calibration_curve_put_in_it():
    """0.45 and 0.5 share a bin (an edge belongs to the bin below, scikit-learn's rule), 0.55 is
    alone: (2 x |0.5 - 0.475| + 1 x |1 - 0.55|) / 3. Counting with np.histogram's rule (0.5 in the
    bin above) weighed the bins the wrong way round: 0.308."""
    assert expected_calibration_error(np.array([0, 1, 1]), np.array([0.45, 0.5, 0.55])) == pytest.approx(0.5 / 3)


def test_platt_scaling_fixes_overconfidence_and_a_shifted_prior():
    from sklearn.metrics import log_loss

    from raycxr.metrics import calibrate_logits, expected_calibration_error, fit_calibration

    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 4000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(int)  # sigmoid(z) is calibrated
    overconfident = 3 * z  # the same ranking, three times too sharp
    cal = fit_calibration(y, overconfident)
    assert 1 / 3.6 < cal["scale"] < 1 / 2.4 and abs(cal["bias"]) < 0.2
    fixed = calibrate_logits(overconfident, cal)
    assert log_loss(y, fixed) < log_loss(y, 1 / (1 + np.exp(-overconfident)))
    assert roc_auc_score(y, fixed) == pytest.approx(roc_auc_score(y, overconfident))  # ranking unchanged

    # What class weighting does: every logit pushed down by 1.5. A temperature cannot undo a
    # shift; Platt's bias does.
    shifted = z - 1.5
    cal = fit_calibration(y, shifted)
    assert 1.2 < cal["bias"] < 1.8 and 0.85 < cal["scale"] < 1.15
    assert expected_calibration_error(y, 1 / (1 + np.exp(-shifted))) > 0.15
    assert expected_calibration_error(y, calibrate_logits(shifted, cal)) < 0.03


def test_calibration_keeps_logits_beyond_16_apart():
    """Calibration works on logits: confident outputs (|logit| > 16, where float32 probabilities
    saturate at 0 or 1) keep their order and their calibrated values."""
    from raycxr.metrics import calibrate_logits

    cal = {"scale": 0.25, "bias": 0.0}
    p = calibrate_logits(np.array([16.0, 20.0, 40.0, -40.0]), cal)
    assert p[0] < p[1] < p[2] and p[3] > 0
    assert p[2] == pytest.approx(1 / (1 + np.exp(-10.0)))


def test_unstable_threshold_falls_back_to_the_bagged_median():
    from raycxr.metrics import choose_operating_threshold, threshold_stability

    # a small validation split: Youden's arg-max jumps between resamples
    y, p = _scores(40, seed=7, sep=0.7)
    stab = threshold_stability(y, p, np.arange(40), rule="youden", n_boot=300)
    assert stab["unstable"], stab
    t, info = choose_operating_threshold(y, p, np.arange(40), rule="youden")
    assert t == pytest.approx(stab["bootstrap_median"]) and "unstable" in info["how"]
    # plenty of overlapping data: the threshold is pinned down and used as is
    y2, p2 = _scores(3000, seed=5, sep=0.8)
    t2, info2 = choose_operating_threshold(y2, p2, np.arange(3000), rule="youden")
    assert not info2["unstable"] and t2 == pytest.approx(info2["point"])


@pytest.mark.parametrize("rule,target", [("sensitivity", 0.95), ("specificity", 0.95), ("specificity", 0.8)])
def test_sensitivity_and_specificity_rules_meet_their_targets_on_validation(rule, target):
    from raycxr.metrics import binary_metrics, choose_threshold

    y, p = _scores(2000, seed=11, sep=1.0)
    t = choose_threshold(y, p, rule=rule, target=target)
    m = binary_metrics(y, p, threshold=t)
    assert m[rule] >= target
    # and it is the best such threshold: one step further would break the target
    other = "specificity" if rule == "sensitivity" else "sensitivity"
    looser = binary_metrics(y, p, threshold=t + (1e-6 if rule == "sensitivity" else -1e-6))
    assert looser[rule] < target or looser[other] <= m[other]


def test_prior_shift_moves_probabilities_and_predictive_values_not_the_ranking():
    from raycxr.metrics import binary_metrics, calibrate_logits, predictive_values, prior_shift

    rng = np.random.default_rng(0)
    # validation at 74% prevalence (the Kermany pool), a clinic at 30%
    z = np.concatenate([rng.normal(1.5, 1.5, 7400), rng.normal(-1.5, 1.5, 2600)])
    y = np.r_[np.ones(7400), np.zeros(2600)].astype(int)
    cal = {"method": "platt", "scale": 1.0, "bias": 0.0}
    moved = prior_shift(cal, fitted_prevalence=0.74, target_prevalence=0.30)
    assert moved["bias"] == pytest.approx(np.log(0.3 / 0.7) - np.log(0.74 / 0.26))
    p0, p1 = calibrate_logits(z, cal), calibrate_logits(z, moved)
    assert np.all(p1 < p0) and roc_auc_score(y, p1) == pytest.approx(roc_auc_score(y, p0))
    # PPV at 30% from sensitivity/specificity equals the PPV measured on a resample at 30%
    m = binary_metrics(y, p0, threshold=0.5)
    ppv, npv = predictive_values(m["sensitivity"], m["specificity"], 0.30)
    keep = np.r_[np.arange(1114), 7400 + np.arange(2600)]  # 1114 / 3714 = 30% positives
    m30 = binary_metrics(y[keep], p0[keep], threshold=0.5)
    assert ppv == pytest.approx(m30["ppv"], abs=0.03) and npv == pytest.approx(m30["npv"], abs=0.03)
    with pytest.raises(ValueError):
        prior_shift(cal, fitted_prevalence=0.74, target_prevalence=1.0)


def test_operating_points_are_all_fixed_on_validation():
    from raycxr.metrics import operating_points

    y, p = _scores(1500, seed=2, sep=1.0)
    pts = operating_points(y, p, np.arange(1500), target_sensitivity=0.9, target_specificity=0.9, bayes=True)
    assert set(pts) == {"youden", "sensitivity", "specificity", "bayes"}
    assert pts["sensitivity"]["threshold"] < pts["youden"]["threshold"] < pts["specificity"]["threshold"]
    assert pts["bayes"]["threshold"] == 0.5


@pytest.mark.parametrize("n, sep, seed", [(40, 0.7, 7), (400, 1.2, 11)])  # an unstable (bagged) and a stable one
def test_prevalence_moves_the_probabilities_not_the_operating_points_or_the_calibration_figures(n, sep, seed):
    """--prevalence P (a prior shift folded into the calibration) leaves every rule's sensitivity and
    specificity on new films, and Brier and ECE, as they are without it, for several P (issue 26)."""
    from scipy.special import logit

    from raycxr.metrics import IDENTITY_CALIBRATION, bias_shift, binary_metrics, calibrate_logits, operating_points, prior_shift

    y, p = _scores(n, seed=seed, sep=sep)
    hy, hp = _scores(500, seed=12, sep=sep)
    z, hz = logit(p), logit(hp)
    figures = {}
    for prevalence in (None, 0.05, 0.3, 0.5, 0.9):
        cal = IDENTITY_CALIBRATION if prevalence is None else prior_shift(
            IDENTITY_CALIBRATION, fitted_prevalence=float(y.mean()), target_prevalence=prevalence)
        vp, hold = calibrate_logits(z, cal), calibrate_logits(hz, cal)
        points = operating_points(y, vp, np.arange(n), seed=0)
        out = {}
        for rule, pt in points.items():
            m = binary_metrics(hy, hold, threshold=pt["threshold"], prior_shift=bias_shift(cal))
            out[rule] = (m["sensitivity"], m["specificity"], pt["stability"]["unstable"], round(m["brier"], 12),
                         round(m["ece"], 12))
        figures[prevalence] = out
    assert any(v[2] for v in figures[None].values()) == (n == 40)  # the small split's thresholds are bagged
    for prevalence, out in figures.items():
        assert out == figures[None], prevalence
