"""promote's decisions as pure functions of logits (raycxr.promote.operate, at_points): no Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest

from raycxr.data import SplitArrays
from raycxr.metrics import calibrate_logits
from raycxr.promote import PromoteConfig, at_points, operate


def _films(n: int, *, shift: float, seed: int) -> tuple[SplitArrays, np.ndarray]:
    """``n`` films (one per patient), half positive, and logits whose classes sit ``shift`` apart."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    z = rng.normal(size=n) + shift * y - shift / 2
    films = SplitArrays(images=np.zeros((n, 1, 2, 2), np.uint8), y=y, groups=np.array([f"p{i}" for i in range(n)]),
                        sources=np.array(["s"] * n))
    return films, z


def _cfg(**kw) -> PromoteConfig:
    return PromoteConfig(run="unused", out="unused", **kw)


def test_operate_fixes_every_operating_point_on_the_selection_films():
    val, z = _films(400, shift=3.0, seed=0)
    op = operate(val, z, val_y=val.y, val_z=z, site=False, rule="youden", cfg=_cfg(), on="validation")
    assert op.calibration["method"] == "platt" and op.calibration["scale"] > 0
    assert set(op.points) == {"youden", "sensitivity", "specificity"} and op.threshold == op.points["youden"]["threshold"]
    assert op.internal_validation is None and op.stability["how"]
    # the sensitivity point misses at most 5% of positives on these films, the specificity point false-alarms on 5%
    p = calibrate_logits(z, op.calibration)
    assert np.allclose(op.sel_p, p)
    sens = (p[val.y == 1] >= op.points["sensitivity"]["threshold"]).mean()
    spec = (p[val.y == 0] < op.points["specificity"]["threshold"]).mean()
    assert sens >= 0.95 and spec >= 0.95
    assert op.validation["n"] == 400 and 0.85 < op.validation["sensitivity"] < 1 and op.validation["auc"] > 0.95


def test_a_stated_prevalence_moves_probabilities_not_the_ranking_or_each_points_figures():
    val, z = _films(400, shift=2.0, seed=1)
    base = operate(val, z, val_y=val.y, val_z=z, site=False, rule="youden", cfg=_cfg(), on="validation")
    rare = operate(val, z, val_y=val.y, val_z=z, site=False, rule="bayes", cfg=_cfg(threshold_rule="bayes",
                                                                                    prevalence=0.05), on="validation")
    assert rare.calibration["bias"] < base.calibration["bias"] and rare.threshold == 0.5
    assert rare.sel_p.mean() < base.sel_p.mean()
    assert rare.validation["auc"] == pytest.approx(base.validation["auc"])
    # Brier at the split's own prevalence, not at the stated one
    assert rare.validation["brier"] == pytest.approx(base.validation["brier"], abs=1e-9)
    for name in ("youden", "sensitivity", "specificity"):
        a = at_points({name: base.points[name]}, val.y, base.sel_p)[name]
        b = at_points({name: rare.points[name]}, val.y, rare.sel_p)[name]
        assert (a["sensitivity"], a["specificity"]) == pytest.approx((b["sensitivity"], b["specificity"]))


def test_a_site_with_few_events_refits_only_the_intercept_and_keeps_the_internal_figures():
    val, vz = _films(400, shift=3.0, seed=2)
    site, sz = _films(40, shift=3.0, seed=3)
    sz = sz + 1.5  # the site's films score higher: a shift calibration-in-the-large undoes
    op = operate(site, sz, val_y=val.y, val_z=vz, site=True, rule="accuracy", cfg=_cfg(), on="site-val")
    internal = operate(val, vz, val_y=val.y, val_z=vz, site=False, rule="youden", cfg=_cfg(), on="validation")
    assert op.calibration["fitted_on"] == "site-val" and op.calibration["refit"].startswith("intercept only")
    assert op.calibration["scale"] == pytest.approx(internal.calibration["scale"])
    assert op.calibration["bias"] < internal.calibration["bias"]
    assert "accuracy" in op.points and op.validation["n"] == 40 and op.internal_validation["n"] == 400


def test_at_points_reads_each_threshold_on_other_films_beside_the_in_sample_figures():
    val, z = _films(200, shift=2.5, seed=4)
    hold, hz = _films(100, shift=2.5, seed=5)
    op = operate(val, z, val_y=val.y, val_z=z, site=False, rule="youden", cfg=_cfg(prevalence=0.2), on="validation")
    hp = calibrate_logits(hz, op.calibration)
    table = at_points(op.points, hold.y, hp, sel=(val.y, op.sel_p), prevalence=0.2)
    row = table["youden"]
    assert row["threshold"] == op.threshold and row["how"] == op.points["youden"]["how"]
    assert row["sensitivity"] == pytest.approx(float((hp[hold.y == 1] >= op.threshold).mean()))
    assert row["val_sensitivity"] == pytest.approx(op.validation["sensitivity"])
    assert 0 < row["ppv_at_prevalence"] < row["ppv"]  # 20% positives instead of the films' 50%
    plain = at_points(op.points, hold.y, hp)["youden"]
    assert set(plain) == {"threshold", "sensitivity", "specificity", "ppv", "npv", "accuracy"}


@pytest.mark.parametrize("options, flag", [({"tta": "of"}, "--tta"), ({"ensemble": "yes"}, "--ensemble"),
                                           ({"select": "best"}, "--select"), ({"threshold_rule": "bayes"},
                                                                              "--threshold-rule"),
                                           ({"prevalence": 1.5}, "--prevalence"), ({"quantize": "int4"}, "--quantize")])
def test_promote_options_are_checked_where_they_are_declared(options, flag):
    from raycxr.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(**options)
    assert str(err.value).startswith(flag)
