"""Benchmark: int8 serving of a promoted model on this CPU (issue 25), as `promote --quantize int8` does it.

model.onnx of MODEL (a promoted folder) is quantised statically (ONNX Runtime's quantiser, QDQ,
per-channel int8 weights, uint8 activations) with activation ranges from the first 256 films of
DATA's validation split, then judged by raycxr's rule (raycxr.serving.int8_rule: paired patient
bootstrap of validation AUC, int8 - fp32, lower bound above -0.005); both models' holdout AUC with
patient-bootstrap CIs; the latency table of both (batch 1 and 16, 1 thread and every core, median
of 30 after warm-up, ONNX Runtime with its graph optimisations). DATA must hold the films MODEL was
chosen and tested on (the same ingest, or a re-ingest with the same salt, seed and size).

Run alone on the machine. Usage:
  .venv/bin/python scripts/bench/int8_serving.py MODEL DATA [--out DIR] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    from raycxr.data import split_arrays
    from raycxr.metrics import bootstrap_ci, calibrate_logits
    from raycxr.models import PromotedModel
    from raycxr.serving import (format_latency, int8_rule, latency, model_inputs, onnx_outputs, quantize_int8,
                                trial_like_latency)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, help="where to keep model.int8.onnx (default: a temporary folder)")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    promoted = PromotedModel.load(args.model)
    spec, t = promoted.spec, promoted.spec.target_index
    out = args.out or Path(tempfile.mkdtemp(prefix="int8-"))
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = args.model / "model.onnx", out / "model.int8.onnx"
    val, hold = (split_arrays(args.data, s, spec.target) for s in ("val", "holdout"))
    xv = model_inputs(spec, val.images)
    quantize_int8(fp32, int8, xv[:256])
    zv = [onnx_outputs(f, xv)[:, t] for f in (fp32, int8)]
    rule = int8_rule(val.y, val.groups, *zv, n_boot=args.n_boot)
    xh = model_inputs(spec, hold.images)
    result = {"model": str(args.model), "architecture": spec.architecture, "tta": promoted.tta,
              "validation_rule": rule, "holdout": {}}
    for name, f in (("fp32", fp32), ("int8", int8)):
        p = calibrate_logits(onnx_outputs(f, xh)[:, t], promoted.calibration)
        ci = bootstrap_ci(hold.y, p, hold.groups, threshold=promoted.threshold, n_boot=args.n_boot)
        from sklearn.metrics import roc_auc_score

        result["holdout"][name] = {"auc": float(roc_auc_score(hold.y, p)), "auc_ci95": ci["auc"]}
    table = {"fp32": latency(fp32, image_size=spec.image_size), "int8": latency(int8, image_size=spec.image_size)}
    result["latency"] = table
    result["trial_like_latency_ms"] = {k: trial_like_latency({"fp32": v}) for k, v in table.items()}
    print(json.dumps({k: v for k, v in result.items() if k != "latency"}, indent=1))
    print(format_latency(table))
    for b in (1, 16):
        for th in sorted({r["threads"] for r in table["fp32"]}):
            f, i = (next(r["median_ms"] for r in table[k] if r["batch"] == b and r["threads"] == th)
                    for k in ("fp32", "int8"))
            print(f"batch {b}, {th} thread(s): int8 / fp32 latency {i / f:.2f} (speed-up {f / i:.2f}x)")
    (out / "int8_serving.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
