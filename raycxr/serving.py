"""Serving a promoted model on a CPU: int8 quantisation that keeps its AUC, and latency as users serve.

- :func:`quantize_int8`: static int8 quantisation of an ONNX export with ONNX Runtime's quantiser
  (QDQ format, per-channel int8 weights, uint8 activations: the U8S8 kernels that use VNNI and AMX
  where a CPU has them), its activation ranges calibrated on validation films.
- :func:`int8_rule`: the int8 model is accepted only if the paired patient bootstrap of the AUC
  difference (int8 - fp32) on the films it was chosen on has its 2.5% bound above ``-tolerance``.
- :func:`latency`: batch-1 and batch-16 latency of an ONNX file under ONNX Runtime (graph
  optimisations on), on one thread and on every core: the median of 30 runs after warm-up.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from raycxr.data import SplitArrays
    from raycxr.models import ModelSpec
    from raycxr.promote import Choice

_log = logging.getLogger(__name__)

INT8_TOLERANCE = 0.005  # the largest AUC loss (int8 - fp32) the bootstrap's lower bound may show
INT8_FILE = "model.int8.onnx"


def cpu_count() -> int:
    """The cores this process may run on (the affinity mask, which containers and Ray narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def session(path: str | Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimisation; ``threads`` intra-op threads
    (None: ONNX Runtime's default, every core), one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # the quantised graph's benign "shape mismatch" notes are not the user's business
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | Path, inputs: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The ONNX model's first output over ``inputs`` (N, ...), batch by batch. ``inputs`` in the
    dtype the graph takes (float32 network inputs; uint8 pixels for a serving graph)."""
    s = session(path)
    name = s.get_inputs()[0].name
    out = [s.run(None, {name: np.ascontiguousarray(inputs[i:i + batch_size])})[0]
           for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,))


def quantize_int8(model: str | Path, out: str | Path, calibration: np.ndarray, *, batch_size: int = 16) -> Path:
    """Write ``out``: ``model`` (an fp32 ONNX file) quantised to int8, QDQ format, activation ranges
    from ``calibration`` (what the graph takes: float32 network inputs (N, 1, S, S), or uint8
    pixels). ONNX Runtime's pre-processing (shape inference, graph optimisation) runs first, as its
    documentation asks."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: np.ascontiguousarray(calibration[i:i + batch_size])}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    name = session(model, threads=1).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=False)
        # the convolutions and matrix products (where the time goes, and what VNNI/AMX run in int8);
        # the graph's ends (resizes, normalisation, the logit or probability out) stay float
        quantize_static(str(prepared), str(out), _Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"], calibrate_method=CalibrationMethod.MinMax)
    return Path(out)


def int8_rule(y: np.ndarray, groups: np.ndarray, z_fp32: np.ndarray, z_int8: np.ndarray, *, n_boot: int = 1000,
              seed: int = 0, tolerance: float = INT8_TOLERANCE) -> dict:
    """Whether the int8 model keeps the fp32 model's AUC on these films: the paired patient bootstrap
    (each resample scores both models on the same patients) of AUC(int8) - AUC(fp32)
    (:func:`raycxr.select.paired_gain`); accepted when its 2.5% percentile is above ``-tolerance``."""
    from raycxr.select import paired_gain

    g = paired_gain(y, groups, z_fp32, z_int8, n_boot=n_boot, seed=seed)
    return {"auc_fp32": g["base"], "auc_int8": g["candidate"], "difference": g["gain"],
            "difference_ci95": g["gain_ci95"], "tolerance": tolerance, "accepted": g["gain_ci95"][0] > -tolerance,
            "n_boot_used": g["n_boot_used"]}


def latency(path: str | Path, *, image_size: int, batch_sizes: tuple = (1, 16), threads: tuple | None = None,
            repeats: int = 30, warmup: int = 5) -> list[dict]:
    """Latency of an ONNX model on this CPU: per batch size and thread count (default 1 and every
    core), the median of ``repeats`` runs after ``warmup`` runs, in ms (and per image), and their
    minimum (how trials measure ``latency_ms``: batch 1, one thread)."""
    rows = []
    for n_threads in threads or tuple(dict.fromkeys((1, cpu_count()))):
        s = session(path, threads=n_threads)
        name = s.get_inputs()[0].name
        for batch in batch_sizes:
            x = np.random.default_rng(0).standard_normal((batch, 1, image_size, image_size)).astype(np.float32)
            for _ in range(warmup):
                s.run(None, {name: x})
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.run(None, {name: x})
                times.append((time.perf_counter() - t0) * 1e3)
            median = float(np.median(times))
            # min_ms: what a trial reports as latency_ms (contention only ever adds time)
            rows.append({"batch": batch, "threads": n_threads, "median_ms": median, "per_image_ms": median / batch,
                         "min_ms": float(np.min(times))})
    return rows


def format_latency(table: dict[str, list[dict]]) -> str:
    """Lines of a {name: latency rows} table, e.g. for ``promote`` and ``predict --benchmark``."""
    lines = []
    for name, rows in table.items():
        for r in rows:
            lines.append(f"  {name:5s} batch {r['batch']:2d}, {r['threads']} thread{'s' if r['threads'] > 1 else ' '}: "
                         f"{r['median_ms']:8.2f} ms ({r['per_image_ms']:.2f} ms per image)")
    return "\n".join(lines)


def benchmark_model(model_dir: str | Path) -> dict[str, list[dict]]:
    """:func:`latency` of a promoted model folder's ONNX exports (``raycxr predict --benchmark``)."""
    from raycxr.models import PromotedModel

    promoted = PromotedModel.load(model_dir)
    files = {"fp32": Path(model_dir) / "model.onnx", "int8": Path(model_dir) / INT8_FILE}
    return {name: latency(f, image_size=promoted.spec.image_size) for name, f in files.items() if f.is_file()}


def trial_like_latency(table: dict[str, list[dict]]) -> float | None:
    """The promoted fp32 export's batch-1, one-thread minimum: comparable with trials' ``latency_ms``."""
    return next((r["min_ms"] for r in table.get("fp32", []) if r["batch"] == 1 and r["threads"] == 1), None)


def model_inputs(spec: "ModelSpec", images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The network's float32 input (N, 1, S, S) for uint8 films: what the ONNX exports take."""
    import torch

    from raycxr.transforms import to_model_input

    return np.concatenate([to_model_input(torch.from_numpy(images[i:i + batch_size].copy()),
                                          image_size=spec.image_size, mean=spec.mean, std=spec.std,
                                          equalize=spec.equalize).numpy()
                           for i in range(0, len(images), batch_size)])


def serving_exports(out: Path, choice: "Choice", hold: "SplitArrays", *, quantize: str, n_boot: int,
                    seed: int) -> tuple[dict, dict | None]:
    """Promote's serving step: (latency of each exported ONNX model in ``out``, the int8 decision or
    None) for the card. ``choice``: what promote decided (:class:`raycxr.promote.Choice`: the model's
    spec, the selection films and validation, calibration and threshold); ``hold``: the holdout.

    With ``quantize="int8"`` (``--quantize int8``): quantise model.onnx with activation ranges from the selection films,
    accept it only if the paired patient bootstrap of the AUC difference on those films holds
    (:func:`raycxr.serving.int8_rule`), then score the holdout (already read by this promote) with
    it. A refused int8 model is deleted; the card says why, with the measured drop."""
    from raycxr.metrics import binary_metrics, bootstrap_ci, calibrate_logits
    from raycxr.select import rank_auc

    spec, sel, val, on = choice.spec, choice.sel, choice.val, choice.on
    calibration, threshold = choice.op.calibration, choice.op.threshold
    fp32 = out / "model.onnx"
    table = {"fp32": latency(fp32, image_size=spec.image_size)}
    if quantize != "int8":
        return table, None
    _log.info("promote: int8 ONNX, calibrated on %s films, accepted only if it keeps the AUC", on)
    x = model_inputs(spec, sel.images)
    base = {"on": on, "file": INT8_FILE, "format": "QDQ, per-channel int8 weights, uint8 activations",
            "calibration_films": int(min(256, len(x)))}
    try:
        quantize_int8(fp32, out / INT8_FILE, x[:256])
    except Exception as exc:  # an operator the quantiser cannot handle: the fp32 model is still promoted
        (out / INT8_FILE).unlink(missing_ok=True)
        why = f"refused: ONNX Runtime's quantiser failed on this graph ({type(exc).__name__}: {str(exc)[:200]})"
        _log.warning("int8 export %s", why)
        return table, {**base, "accepted": False, "why": why, "n_boot_used": 0}
    t = spec.target_index

    def both(inputs):
        return onnx_outputs(fp32, inputs)[:, t], onnx_outputs(out / INT8_FILE, inputs)[:, t]

    z_sel = both(x)
    rule = int8_rule(sel.y, sel.groups, *z_sel, n_boot=n_boot, seed=seed)
    decision = {**base, **rule}
    lo = rule["difference_ci95"][0]
    if not rule["accepted"]:
        (out / INT8_FILE).unlink()
        decision["why"] = (f"refused: int8 - fp32 {on} AUC {rule['difference']:+.4f}, 95% CI lower bound {lo:+.4f} "
                           f"is below -{rule['tolerance']}; model.int8.onnx was not kept")
        _log.warning("int8 export %s", decision["why"])
        return table, decision
    decision["why"] = (f"accepted: int8 - fp32 {on} AUC {rule['difference']:+.4f}, 95% CI lower bound {lo:+.4f} "
                       f"> -{rule['tolerance']}")
    # the promoted model's own validation AUC as each file computes it: the Pareto plot's points
    val_pair = z_sel if on == "validation" else both(model_inputs(spec, val.images))
    decision["val_auc"] = {k: float(rank_auc(val.y, z)) for k, z in zip(("fp32", "int8"), val_pair)}
    hz32, hz8 = both(model_inputs(spec, hold.images))
    for name, z in (("fp32", hz32), ("int8", hz8)):
        p = calibrate_logits(z, calibration)
        m = binary_metrics(hold.y, p, threshold=threshold)
        ci = bootstrap_ci(hold.y, p, hold.groups, threshold=threshold, n_boot=n_boot, seed=seed)
        decision.setdefault("holdout", {})[name] = {k: m[k] for k in ("auc", "accuracy", "sensitivity",
                                                                      "specificity")} | {"auc_ci95": ci["auc"]}
    table["int8"] = latency(out / INT8_FILE, image_size=spec.image_size)
    return table, decision
