"""promote(): finalists by validation -> noise-aware choice (one model or an ensemble) -> holdout once -> exports + card.

Only this stage (and a later ``evaluate``) opens the holdout split. Which model is promoted
(:mod:`raycxr.select`), test-time augmentation, calibration, a stated prevalence and every
operating threshold are chosen on the validation split, before the holdout is read, and never
changed after. Every holdout read is logged in the run folder, and the model card says if it was
read before. ``raycxr evaluate`` (:mod:`raycxr.evaluate`) scores a promoted model on other data later.

For a search with ``--site`` (:mod:`raycxr.sites`), ``--select site`` (the default then) makes all
of those choices on the site's site-val films instead, and reads the site's site-test films once,
in the same ledger: their figures are the card's headline, the internal holdout a secondary table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from raycxr.data import SplitArrays, split_arrays
from raycxr.errors import ConfigError, DataError, ExportError, NoEligibleTrialError
from raycxr.models import EXPORT_TOLERANCE, MemberSpec, ModelSpec, PromotedModel, export_onnx
from raycxr.predict import target_logits, write_predictions
from raycxr.progress import bar
from raycxr.card import ModelCard
from raycxr.storage import RunStore, exists, local_copy
from raycxr.train import CheckpointRecord

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PromoteConfig:
    run: str | Path                  # the run folder or its storage URI (s3://bucket/raycxr/NAME)
    out: Path
    data: Path | None = None         # the dataset, when not at the path the search recorded (same fingerprint)
    threshold_rule: str = "auto"     # auto (accuracy for --select site, else youden) | youden | sensitivity |
    #                                  specificity | accuracy | bayes (needs prevalence)
    target_sensitivity: float = 0.95
    target_specificity: float = 0.95
    prevalence: float | None = None  # the clinic's prevalence: probabilities and PPV/NPV corrected to it
    n_boot: int = 1000
    seed: int = 0
    force: bool = False  # overwrite an existing --out folder
    tta: str = "auto"    # test-time augmentation: auto (kept if it raises validation AUC), on, off
    select: str = "auto"       # auto (site for a search with --site, else shift-auc), shift-auc, val-auc, site
    finalists: int = 4
    ensemble: str = "auto"     # auto | on | off (raycxr.select)
    fastest_within: float | None = None  # promote the quickest trial within this validation AUC of the best
    serving_onnx: bool = False  # also export model.serving.onnx: uint8 pixels in, calibrated P(target) out
    register: str | None = None  # register the promoted model under this name in the MLflow Model Registry
    mlflow: str | None = None    # the MLflow tracking URI for --register (default $MLFLOW_TRACKING_URI)
    quantize: str = "none"       # none | int8: also export model.int8.onnx if it keeps the AUC (raycxr.serving)

    def __post_init__(self):
        from raycxr.metrics import THRESHOLD_CHOICES

        if self.threshold_rule not in THRESHOLD_CHOICES:
            raise ConfigError(f"--threshold-rule {self.threshold_rule!r}: allowed: {', '.join(THRESHOLD_CHOICES)}",
                              source="--threshold-rule")
        if self.quantize not in ("none", "int8"):
            raise ConfigError(f"--quantize {self.quantize!r}: allowed: none, int8", source="--quantize")
        if self.ensemble == "on" and (self.select == "val-auc" or self.fastest_within is not None):
            rule = "--select val-auc" if self.select == "val-auc" else "--fastest-within"
            raise ConfigError(f"--ensemble on asks for an ensemble but {rule} promotes one trial: drop one of the "
                              "two (--select shift-auc or site compare finalists and can ensemble them)")


def _export(model, out: Path, sample: "np.ndarray") -> dict:
    """Write TorchScript and ONNX next to the safetensors weights; check both match eager."""
    import warnings

    import torch

    x = torch.from_numpy(sample)
    # TorchScript is deprecated in torch 2.14 but still what many serving stacks load; keep it
    # until they move, and say nothing about it on every promote.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # an ensemble member resizes only if its input size differs from the stored one: a Python
        # test on fixed shapes, which the trace (always at the stored size) records correctly
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        eager = model(x).numpy()
        torch.jit.trace(model, x[:2]).save(str(out / "model.torchscript.pt"))
        ts_out = torch.jit.load(str(out / "model.torchscript.pt"))(x).numpy()
    onnx_out = export_onnx(model, sample, out / "model.onnx", output="logit")
    diffs = {"torchscript": float(np.abs(ts_out - eager).max()), "onnx": float(np.abs(onnx_out - eager).max())}
    for name, d in diffs.items():
        if d > EXPORT_TOLERANCE:
            raise ExportError(f"{name} export differs from the eager model by {d:.2e} (> {EXPORT_TOLERANCE}); "
                               "the export is not trustworthy: report this with the model name")
    return diffs


def _choose_tta(model, spec: ModelSpec, val: SplitArrays, vz: np.ndarray, *, mode: str, n_boot: int = 1000,
                seed: int = 0) -> tuple:
    """(model, validation logits, what was decided) for test-time augmentation.

    ``auto`` keeps TTA only if its AUC gain on ``val`` is clear of noise: the paired patient
    bootstrap's 95% interval of the gain lies above 0 (:func:`raycxr.select.paired_gain`, the rule
    ensembles follow; TTA costs 4x the latency). ``on`` and ``off`` force it. Both AUCs and the
    gain's interval are recorded either way, except with ``off``.
    """
    from raycxr.select import paired_gain
    from raycxr.transforms import TTA_VIEWS

    if mode == "off":
        return model, vz, {"used": False, "mode": mode}
    wrapped = spec.with_tta(model)
    wz = target_logits(wrapped, spec, val.images, progress="scoring validation with TTA")
    nan = float("nan")
    g = (paired_gain(val.y, val.groups, vz, wz, n_boot=n_boot, seed=seed) if len(np.unique(val.y)) == 2 else
         {"base": nan, "candidate": nan, "gain": nan, "gain_ci95": [nan, nan], "kept": False})
    used = mode == "on" or g["kept"]
    info = {"used": used, "mode": mode, "val_auc_without": g["base"], "val_auc_with": g["candidate"],
            "gain_ci95": g["gain_ci95"], "views": [{"rotation_deg": r, "scale": sc} for r, sc in TTA_VIEWS]}
    return (wrapped, wz, info) if used else (model, vz, info)


LEDGER = "holdout_reads.jsonl"


def _holdout_reads(store: RunStore, split: str = "holdout") -> list[dict]:
    """Earlier reads of ``split`` (``holdout`` or ``site-test``) logged in the run's ledger."""
    if not store.exists(LEDGER):
        return []
    reads = []
    for line in store.read_text(LEDGER).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed promote: it was a read all the same, but not one to count here
        if isinstance(entry, dict) and entry.get("split", "holdout") == split:
            reads.append(entry)
    return reads


# The measured gap between an internal holdout and films collected elsewhere, for a card without
# site data: raycxr's 60-minute Kermany search (BENCHMARKS.md, 2026-11-29 and issue 24): holdout
# carved from the train split AUC 1.000 / accuracy 0.988; Kermany's separately collected official
# test split AUC 0.950 / accuracy 0.872, specificity 0.66.
NO_SITE_STATEMENT = (
    "No site figure exists: this search had no films of the deploying site (`raycxr search --site`), so "
    "every figure below is internal (validation and a holdout carved from the training sources). Internal "
    "figures overestimate how a model does elsewhere: for raycxr's 60-minute Kermany search the internal "
    "holdout gave AUC 1.000 and accuracy 0.988, but Kermany's separately collected test films gave AUC 0.950, "
    "accuracy 0.872 and specificity 0.66 (BENCHMARKS.md). Label a few hundred of the site's own films, ingest "
    "them and search with `--site` before relying on this model there.")


def _site_part(sites: list, part: str, target: str) -> SplitArrays:
    """One part (site-val or site-test) of every site of the run, pooled (sources = site names)."""
    from raycxr.sites import site_arrays

    parts = [site_arrays(site, part, target) for site in sites]
    return SplitArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "y", "groups", "sources")))


def _checkpoint(row: dict) -> Path:
    """A leaderboard row's checkpoint on this disk (fetched from the run's storage when remote)."""
    return local_copy(row["checkpoint"])


def _select(cfg: PromoteConfig, eligible: list[dict], val: SplitArrays, *, rule: str) -> tuple[list[dict], dict]:
    """(the chosen leaderboard rows, the selection record for the card), on ``val`` only: the
    validation split, or for ``rule == "site"`` the sites' site-val films."""
    from raycxr.select import choose, fastest_within, views_of

    if cfg.fastest_within is not None:
        i, why = fastest_within(eligible, cfg.fastest_within)
        return [eligible[i]], {"rule": "fastest-within", "kind": "single", "why": why, "finalists": []}
    if rule == "site":  # finalists by their kept epoch's site-val AUC, then ties and ensembles on site-val itself
        ranked = sorted(eligible, key=lambda r: -(r["site_auc"] if r.get("site_auc") is not None else -1.0))
        finalists = ranked[:max(1, cfg.finalists)]
        if len(finalists) == 1:
            return finalists, {"rule": "site", "kind": "single", "finalists": [],
                               "why": "the only eligible trial (site-val AUC "
                                      f"{finalists[0].get('site_auc', float('nan')):.4f})"}
        logits = []
        for row in bar(finalists, desc="scoring finalists on site-val", unit="model", leave=False):
            spec = _record(row).spec
            logits.append([target_logits(spec.load_network(_checkpoint(row)), spec, val.images)])
        decision = choose(finalists, np.asarray(logits), val.y, val.groups, ensemble=cfg.ensemble,
                          n_boot=cfg.n_boot, seed=cfg.seed, score="site-val AUC")
        decision.update(rule="site", views=["site-val"])
        return [finalists[i] for i in decision["members"]], decision
    finalists = eligible[:max(1, cfg.finalists)]
    if rule == "val-auc" or len(finalists) == 1:
        return finalists[:1], {"rule": rule, "kind": "single", "finalists": [],
                               "why": "highest validation AUC" + (" (the only eligible trial)" if len(eligible) == 1
                                                                   else "")}
    views = {}  # per input size: each finalist is shifted in its own input space (views_of)
    logits = []
    for row in bar(finalists, desc="scoring finalists on validation views", unit="model", leave=False):
        spec = _record(row).spec
        model = spec.load_network(_checkpoint(row))
        if spec.image_size not in views:
            views[spec.image_size] = views_of(val.images, size=spec.image_size, seed=cfg.seed)
        logits.append([target_logits(model, spec, v) for v in views[spec.image_size].values()])
    decision = choose(finalists, np.asarray(logits), val.y, val.groups, ensemble=cfg.ensemble,
                      n_boot=cfg.n_boot, seed=cfg.seed)
    return [finalists[i] for i in decision["members"]], decision


def _record(row: dict) -> CheckpointRecord:
    return CheckpointRecord.load(_checkpoint(row))


def _build(chosen: list[dict]) -> tuple:
    """(model, spec, state dict to save) for one trial or an ensemble of several."""
    from raycxr.transforms import Ensemble

    specs = [_record(r).spec for r in chosen]
    models = [s.load_network(_checkpoint(r)) for r, s in zip(chosen, specs)]
    if len(chosen) == 1:
        return models[0], specs[0], None
    first = specs[0]
    spec = ModelSpec(architecture="ensemble", findings=first.findings, target=first.target,
                     image_size=first.stored_size, stored_size=first.stored_size, resize=first.resize, mean=0.0,
                     std=1.0, members=tuple(MemberSpec(architecture=s.architecture, image_size=s.image_size,
                                                       mean=s.mean, std=s.std, drop_rate=s.drop_rate,
                                                       pretrained=s.pretrained, trial_id=s.trial_id,
                                                       equalize=s.equalize) for s in specs))
    model = Ensemble(models, image_sizes=[s.image_size for s in specs], means=[s.mean for s in specs],
                     stds=[s.std for s in specs], equalizes=[s.equalize for s in specs]).eval()
    return model, spec, {k: v.contiguous() for k, v in model.state_dict().items()}


def _site_test(store: RunStore, sites: list, model, spec: ModelSpec, calibration: dict, points: dict, *,
               threshold: float, target: str, out: Path, final: Path, cfg: PromoteConfig, trial_ids: str) -> dict:
    """The sites' site-test films, read once (logged in the run's ledger before they are read):
    the card's headline figures, with patient-bootstrap CIs, at every operating point."""
    from raycxr.metrics import bias_shift, binary_metrics, calibrate_logits, report

    from raycxr.ledger import record_read

    # write-ahead, in the run's ledger and in each site's own (raycxr.ledger: every read of these films,
    # whichever run made it)
    in_run = _holdout_reads(store, "site-test")
    store.append_line(LEDGER, json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "split": "site-test", "trial_id": trial_ids,
        "sites": {s.name: s.digest["site-test"] for s in sites}, "out": str(final.resolve())}))
    earlier = [record_read(s.data, fingerprint=s.fingerprint, split="site-test", digest=s.digest["site-test"],
                           by="promote", site=s.name, trial_id=trial_ids, out=str(final.resolve())) for s in sites]
    previous = max([in_run, *earlier], key=len)
    log.info("promote 2/4: scoring the site-test films, once")
    test = _site_part(sites, "site-test", target)
    p = calibrate_logits(target_logits(model, spec, test.images, progress="scoring site-test"), calibration)
    write_predictions(out / "site_test_predictions.csv", sources=test.sources, groups=test.groups, y=test.y,
                      probabilities=p)
    at_points = {}
    for name, pt in points.items():
        m = binary_metrics(test.y, p, threshold=pt["threshold"], prior_shift=bias_shift(calibration))
        at_points[name] = {"threshold": pt["threshold"], **{k: m[k] for k in ("sensitivity", "specificity", "ppv",
                                                                               "npv", "accuracy")}}
    return {"kind": "site", "split": "site-test", "sites": [s.to_dict() for s in sites],
            "previously_read": len(previous), "operating_points": at_points,
            "metrics": report(test.y, p, groups=test.groups, sources=test.sources, threshold=threshold,
                              prior_shift=bias_shift(calibration),
                              n_boot=cfg.n_boot, seed=cfg.seed)}


def _check_out(out: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that holds anything but, with ``--force``, a promoted model: a flag must
    never delete a home folder or a dataset."""
    if not (out.exists() and any(out.iterdir())):
        return
    if not force:
        raise ConfigError(f"{out} already exists: choose another --out or pass --force", source="--out")
    try:
        PromotedModel.load(out)
    except ConfigError:
        raise ConfigError(f"{out} is not a model raycxr promoted (no valid config.json): --force replaces only "
                          "a promoted model, and nothing in this folder was touched; choose another --out",
                          source="--out") from None


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished model folder ``staging`` at ``out``; an old model there is removed only once the
    new one is in place (a crash at any point leaves one complete model at ``out``)."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.replaced-{staging.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def promote(cfg: PromoteConfig) -> ModelCard:
    """Promote the best trial (or ensemble) of ``cfg.run`` into ``cfg.out``; return its :class:`~raycxr.card.ModelCard`.

    The model is built in a hidden sibling folder and moved to ``cfg.out`` when complete, so a failed
    or killed promote leaves ``cfg.out`` as it was (with ``--force``, the old model)."""
    import tempfile

    final = Path(cfg.out)
    _check_out(final, force=cfg.force)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.promoting-", dir=final.parent))
    try:
        card = _promote(cfg, out=staging, final=final)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from colleagues
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cfg.register:
        from raycxr.tracking import register_model

        card.registry = register_model(final, card, uri=cfg.mlflow, name=cfg.register)
        card.save(final)
    return card


def _card_row(row: dict, model_dir: Path) -> dict:
    """A leaderboard row as the card keeps it: a local checkpoint path relative to the model folder
    (a bucket URI stays as it is: it names no one's home folder)."""
    ckpt = row.get("checkpoint")
    return {**row, "checkpoint": _relative(ckpt, model_dir)} if ckpt and "://" not in ckpt else dict(row)


def _relative(path: str | Path, model_dir: Path) -> str:
    """``path`` relative to the model folder (as the card stores data paths: no home folder in a card,
    and the pair can move together); a URI as it is."""
    from raycxr.storage import is_uri

    if is_uri(path):
        return str(path)
    return os.path.relpath(Path(path).resolve(), model_dir.resolve())


def _promote(cfg: PromoteConfig, *, out: Path, final: Path) -> ModelCard:
    """:func:`promote`'s work, written into ``out`` (the staging folder); ``final`` is where it will be."""
    from raycxr.card import write_model_card
    from raycxr.data import has_manifest, location, read_manifest
    from raycxr.ledger import record_read, split_digest
    from raycxr.metrics import (bias_shift, binary_metrics, calibrate_logits, fit_calibration, fit_site_calibration,
                                operating_points, predictive_values, prior_shift, report)
    from raycxr.select import SELECTION_RULES
    from raycxr.sites import MIN_EVENTS
    from raycxr.report import write_report
    from raycxr.runs import RunRecord, run_history
    from raycxr.serving import model_inputs, serving_exports, trial_like_latency

    rule = cfg.threshold_rule
    if rule == "bayes" and cfg.prevalence is None:
        raise ConfigError("--threshold-rule bayes needs --prevalence P (the clinic's share of positives)",
                          source="--threshold-rule")
    if cfg.prevalence is not None and not 0 < cfg.prevalence < 1:
        raise ConfigError(f"--prevalence {cfg.prevalence} must be a share of positives in (0, 1), e.g. 0.3",
                          source="--prevalence")
    if cfg.select not in SELECTION_RULES:
        raise ConfigError(f"unknown selection rule {cfg.select!r}; use one of {SELECTION_RULES}", source="--select")
    store = RunStore(cfg.run)
    store.require_run("--run")
    run = RunRecord.load(store)
    sites = run.site_records()
    select = cfg.select if cfg.select != "auto" else "site" if sites else "shift-auc"
    if select == "site" and not sites:
        raise ConfigError("--select site needs a search with the deploying site's films (raycxr search --site DATA); "
                          f"{run.name} had none: search again with --site, or use --select shift-auc", source="--select")
    if rule == "auto":  # a site's films say its prevalence: the fewest errors there; otherwise the balanced point
        rule = "accuracy" if select == "site" else "youden"
    data_dir = location(cfg.data or run.data)
    if not has_manifest(data_dir):
        raise ConfigError(f"the search read its data from {data_dir}, which is not here: pass --data with this "
                          "machine's copy of that dataset (its fingerprint must match)", source="--data")
    manifest = read_manifest(data_dir)
    if manifest["fingerprint"] != run.data_fingerprint:
        raise DataError(f"{data_dir} is not the dataset the search used (fingerprint {manifest['fingerprint']} != "
                        f"{run.data_fingerprint}): promote against the dataset the search used")

    history = run_history(store.uri)
    board = history.board
    eligible = [r for r in board if r["status"].startswith("ok") and r.get("checkpoint") and exists(r["checkpoint"])]
    if not eligible:
        raise NoEligibleTrialError(f"no trial of {store.uri} has a validation AUC and a checkpoint in storage: "
                                   "run a search that finishes at least one epoch")
    target = run.target

    # 1. Which model, test-time augmentation, calibration (Platt scaling) and the operating points:
    # all chosen on validation (or the sites' site-val films) only, before the holdout is read.
    val = split_arrays(data_dir, "val", target)
    on = "site-val" if select == "site" else "validation"
    sel = _site_part(sites, "site-val", target) if select == "site" else val
    log.info("promote 1/4: choosing the model, threshold and calibration on %s (%d eligible trials)", on,
             len(eligible))
    chosen, selection = _select(cfg, eligible, sel, rule=select)
    selection["on"] = on
    core, spec, ensemble_state = _build(chosen)
    vz = target_logits(core, spec, sel.images, progress=f"scoring {on}")
    model, vz, tta = _choose_tta(core, spec, sel, vz, mode=cfg.tta, n_boot=cfg.n_boot, seed=cfg.seed)
    internal_z = vz if select != "site" else target_logits(model, spec, val.images, progress="scoring validation")
    calibration = fit_calibration(val.y, internal_z)
    if select == "site":
        calibration = fit_site_calibration(sel.y, vz, internal=calibration, min_events=MIN_EVENTS)
    if cfg.prevalence is not None:
        calibration = prior_shift(calibration, fitted_prevalence=float(sel.y.mean()),
                                  target_prevalence=cfg.prevalence)
    vp = calibrate_logits(vz, calibration)
    points = operating_points(sel.y, vp, sel.groups, target_sensitivity=cfg.target_sensitivity,
                              target_specificity=cfg.target_specificity, bayes=cfg.prevalence is not None,
                              accuracy=select == "site" or rule == "accuracy", seed=cfg.seed, on=on)
    threshold = points[rule]["threshold"]
    stability = points[rule]["stability"] or {"how": points[rule]["how"], "unstable": False}
    if stability["unstable"]:
        log.warning("the %s threshold is unstable: %s", on, stability["how"])
    # Brier and ECE at each split's own prevalence: --prevalence moves the probabilities served and the
    # PPV/NPV quoted at it, never the calibration figures (raycxr.metrics.binary_metrics)
    shift = bias_shift(calibration)
    val_metrics = binary_metrics(sel.y, vp, threshold=threshold, prior_shift=shift)
    internal_val = (binary_metrics(val.y, calibrate_logits(internal_z, calibration), threshold=threshold,
                                   prior_shift=shift)
                    if select == "site" else None)

    # 2. The holdout, once.
    log.info("promote 2/4: scoring the holdout, once")
    # write-ahead, before the films are read: in the run's ledger and in the dataset's own, which counts
    # every read of these films (raycxr.ledger), from this run, another search over the data or evaluate
    trial_ids = "+".join(r["trial_id"] for r in chosen)
    in_run = _holdout_reads(store)
    store.append_line(LEDGER, json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "split": "holdout",
                                          "trial_id": trial_ids, "out": str(final.resolve())}))
    in_data = record_read(data_dir, fingerprint=manifest["fingerprint"], split="holdout",
                          digest=split_digest(data_dir, "holdout"), by="promote", run=run.name, trial_id=trial_ids,
                          out=str(final.resolve()))
    previous_reads = max(in_run, in_data, key=len)
    hold = split_arrays(data_dir, "holdout", target)
    hp = calibrate_logits(target_logits(model, spec, hold.images, progress="scoring the holdout"), calibration)
    write_predictions(out / "holdout_predictions.csv", sources=hold.sources, groups=hold.groups, y=hold.y,
                      probabilities=hp)
    holdout = report(hold.y, hp, groups=hold.groups, sources=hold.sources, threshold=threshold, prior_shift=shift,
                     n_boot=cfg.n_boot,
                     seed=cfg.seed)
    headline = {"kind": "none", "statement": NO_SITE_STATEMENT}
    if select == "site":
        headline = _site_test(store, sites, model, spec, calibration, points, threshold=threshold, target=target,
                              out=out, final=final, cfg=cfg, trial_ids="+".join(r["trial_id"] for r in chosen))
    at_points = {}
    for name, pt in points.items():
        m, v = (binary_metrics(y, p, threshold=pt["threshold"]) for y, p in ((hold.y, hp), (sel.y, vp)))
        at_points[name] = {"threshold": pt["threshold"], "target": pt["target"], "how": pt["how"],
                           **{k: m[k] for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")},
                           "val_sensitivity": v["sensitivity"], "val_specificity": v["specificity"]}
        if cfg.prevalence is not None:
            at_points[name]["ppv_at_prevalence"], at_points[name]["npv_at_prevalence"] = predictive_values(
                m["sensitivity"], m["specificity"], cfg.prevalence)

    log.info("promote 3/4: exports (safetensors, TorchScript, ONNX%s), checked against the model",
             ", serving ONNX" if cfg.serving_onnx else "")
    # 3. Exports: safetensors is the source of truth; TorchScript and ONNX are checked against it.
    if ensemble_state is None:
        shutil.copyfile(_checkpoint(chosen[0]) / "model.safetensors", out / "model.safetensors")
    else:
        from safetensors.torch import save_file

        save_file(ensemble_state, str(out / "model.safetensors"))
    export_diffs = _export(model, out, model_inputs(spec, val.images[:16]))
    latencies, int8 = serving_exports(out, spec, quantize=cfg.quantize, n_boot=cfg.n_boot, seed=cfg.seed, sel=sel,
                                      val=val, hold=hold, calibration=calibration, threshold=threshold, on=on)

    architecture = spec.architecture if ensemble_state is None else "ensemble of " + " + ".join(
        f"{m.architecture}@{m.image_size}px" for m in spec.members)
    promoted = PromotedModel(spec=spec, threshold=threshold, threshold_rule=rule, calibration=calibration,
                             class_names=(f"not_{target}", target), tta=tta["used"],
                             operating_points={k: v["threshold"] for k, v in points.items()},
                             selection={k: selection[k] for k in ("rule", "kind", "why")})
    promoted.save(out)
    log.info("promote 4/4: model card, plots and report")
    if select != "site" and sites:
        headline = {"kind": "none", "statement": (
            f"No site figure: the search had site films ({', '.join(s.name for s in sites)}) but this promotion "
            f"chose with --select {select}, so site-test was not read. " + NO_SITE_STATEMENT.split(": ", 1)[1])}
    elif headline["kind"] == "site":  # where the site data is, relative to the model folder like data.dir
        headline["sites"] = [{**s, "data": _relative(s["data"], final)} for s in headline["sites"]]
    serving = None
    if cfg.serving_onnx:
        from raycxr.predict import Model

        served = Model(model, promoted, directory=out)  # the network already in memory, as saved
        serving = {**served.export_onnx(out / "model.serving.onnx", check_with=val.images[:16]),
                   "path": "model.serving.onnx"}  # relative to the model folder
    rows = {id(r): _card_row(r, final) for r in [*chosen, *board[:5]]}  # checkpoints relative to the model
    card = ModelCard(
        run=run.name, trial=rows[id(chosen[0])], members=[rows[id(r)] for r in chosen], architecture=architecture,
        selection=selection, target=target, threshold=threshold,
        threshold_rule=rule, threshold_stability=stability, calibration=calibration,
        operating_points=at_points, prevalence=cfg.prevalence, tta=tta,
        validation=val_metrics, internal_validation=internal_val, headline=headline,
        holdout=holdout, export_max_abs_diff=export_diffs,
        holdout_previously_read=len(previous_reads),
        holdout_earlier_reads=[{k: e.get(k) for k in ("time", "by", "run", "trial_id")} for e in previous_reads],
        data={"dir": _relative(data_dir, final), "fingerprint": manifest["fingerprint"], "counts": manifest["counts"],
              "split_level": manifest["split_level"], "params": manifest["params"]},
        search_space=run.space_config, versions=run.versions, leaderboard_top=[rows[id(r)] for r in board[:5]],
        pareto=[{k: r.get(k) for k in ("trial_id", "model", "image_size", "val_auc", "latency_ms")} for r in eligible],
        latency=latencies, int8=int8, latency_ms=trial_like_latency(latencies),
        external=[], serving_onnx=serving, registry=None)
    card.save(out)
    write_model_card(card, out / "model_card.md")
    write_report(out, card=card, holdout_y=hold.y, holdout_p=hp, frames=history.frames, prior_shift=shift)
    return card


def api(run: str | Path, out: str | Path, **options) -> ModelCard:
    """``raycxr.promote(run, out, **options)``: :func:`promote` with keyword options (the fields
    of :class:`PromoteConfig`, e.g. ``threshold_rule="sensitivity"``); returns the :class:`~raycxr.card.ModelCard`."""
    return promote(PromoteConfig(run=run, out=Path(out), **options))


from raycxr import callable_stage  # noqa: E402  (after api, which it calls)

callable_stage(__name__)
