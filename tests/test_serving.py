"""raycxr.serving: int8 ONNX that keeps its AUC, and CPU latency as users serve (promote --quantize int8,
Model.export_onnx(quantize="int8"), predict --benchmark), on the shared promoted run's real films."""

from __future__ import annotations

import numpy as np
import pytest

import raycxr
from raycxr.serving import INT8_TOLERANCE, cpu_count, int8_rule, onnx_outputs

pytestmark = pytest.mark.slow


def _ops(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_the_int8_rule_is_a_paired_patient_bootstrap_of_the_auc_difference():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    z = y * 1.5 + rng.standard_normal(400)
    groups = np.arange(400) // 2  # two films per patient
    same = int8_rule(y, groups, z, z.copy(), n_boot=200)
    assert same["accepted"] and same["difference"] == 0 and same["difference_ci95"] == [0.0, 0.0]
    # a model that has lost much of its signal: its AUC drop is measured and refused
    worse = int8_rule(y, groups, z, z + 2 * rng.standard_normal(400), n_boot=200)
    from sklearn.metrics import roc_auc_score

    assert worse["difference"] == pytest.approx(worse["auc_int8"] - worse["auc_fp32"])
    assert worse["auc_fp32"] == pytest.approx(roc_auc_score(y, z))
    assert worse["difference"] < -0.05 and worse["difference_ci95"][0] < -INT8_TOLERANCE and not worse["accepted"]


def test_promote_quantize_int8_keeps_the_int8_model_only_with_its_auc_and_times_both(promoted_run, second_promotion,
                                                                                       capsys):
    from sklearn.metrics import roc_auc_score

    from raycxr.cli import main
    from raycxr.data import split_arrays
    from raycxr.serving import model_inputs as _inputs

    card, out = second_promotion["card"], second_promotion["model"]  # promoted with --quantize int8
    q = card.int8

    # latency: batch 1 and 16, on one thread and on every core, medians in ms
    rows = card.latency["fp32"]
    assert {(r["batch"], r["threads"]) for r in rows} == {(b, t) for b in (1, 16) for t in {1, cpu_count()}}
    assert all(r["median_ms"] > 0 and r["per_image_ms"] == pytest.approx(r["median_ms"] / r["batch"]) for r in rows)

    # the rule, recomputed here from the two files' own outputs on the validation films
    from raycxr.models import PromotedModel

    spec = PromotedModel.load(out).spec
    val = split_arrays(promoted_run["data"], "val", "pneumonia")
    z32 = onnx_outputs(out / "model.onnx", _inputs(spec, val.images))[:, spec.target_index]
    assert q["auc_fp32"] == pytest.approx(roc_auc_score(val.y, z32), abs=1e-9)
    assert q["accepted"] == (q["difference_ci95"][0] > -INT8_TOLERANCE)
    assert (out / "model.int8.onnx").is_file() == q["accepted"]
    text = (out / "model_card.md").read_text()
    assert "## Serving on a CPU" in text and q["why"] in text
    if q["accepted"]:
        # really int8: quantise/dequantise pairs around int8 convolution weights, and AUC kept
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= _ops(out / "model.int8.onnx")
        z8 = onnx_outputs(out / "model.int8.onnx", _inputs(spec, val.images))[:, spec.target_index]
        assert q["auc_int8"] == pytest.approx(roc_auc_score(val.y, z8), abs=1e-9)
        assert not np.allclose(z8, z32, atol=1e-6)
        hold = split_arrays(promoted_run["data"], "holdout", "pneumonia")
        h8 = onnx_outputs(out / "model.int8.onnx", _inputs(spec, hold.images))[:, spec.target_index]
        assert q["holdout"]["int8"]["auc"] == pytest.approx(roc_auc_score(hold.y, h8), abs=1e-9)
        assert q["holdout"]["fp32"]["auc"] == pytest.approx(card.holdout["pooled"]["auc"], abs=1e-4)
        assert {r["threads"] for r in card.latency["int8"]} == {1, cpu_count()}
    else:
        assert q["why"].startswith("refused") and "int8" not in card.latency

    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--benchmark"]) == 0
    printed = capsys.readouterr().out
    assert "fp32  batch  1, 1 thread " in printed and "fp32  batch 16" in printed
    assert ("int8  batch  1" in printed) == q["accepted"]


def test_a_serving_graph_exported_in_int8_keeps_its_auc_or_is_refused(promoted_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    from raycxr.data import split_arrays
    from raycxr.errors import ExportError

    model = raycxr.Model.load(promoted_run["model"])
    val = split_arrays(promoted_run["data"], "val", "pneumonia")
    with pytest.raises(ValueError, match="needs calibration="):
        model.export_onnx(tmp_path / "a.onnx", quantize="int8")
    path = tmp_path / "serving.int8.onnx"
    try:
        result = model.export_onnx(path, quantize="int8", calibration=val.images, labels=val.y, groups=val.groups)
    except ExportError as exc:  # refused: the checked fp32 graph stays at the path, and says so
        assert "loses AUC" in str(exc) and path.is_file() and "QuantizeLinear" not in _ops(path)
        return
    assert result["int8"]["accepted"] and {"QuantizeLinear", "DequantizeLinear"} <= _ops(path)
    p8 = onnx_outputs(path, val.images[:, None])
    assert p8.shape == (len(val.y),) and roc_auc_score(val.y, p8) >= roc_auc_score(
        val.y, model.predict_proba(val.images)) - 0.05
