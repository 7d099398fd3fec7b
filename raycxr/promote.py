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

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from raycxr.data import Manifest, SplitArrays, split_arrays
from raycxr.errors import ConfigError, DataError, ExportError, NoEligibleTrialError
from raycxr.models import EXPORT_TOLERANCE, MemberSpec, ModelSpec, PromotedModel, export_onnx
from raycxr.predict import target_logits, write_predictions
from raycxr.progress import bar
from raycxr.card import ModelCard
from raycxr.runs import RunHistory, RunRecord
from raycxr.storage import RunStore, exists, local_copy
from raycxr.train import CheckpointRecord

log = logging.getLogger(__name__)


QUANTIZE_CHOICES = ("none", "int8")
SWITCH_CHOICES = ("auto", "on", "off")  # --tta and --ensemble


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
        from raycxr.select import SELECTION_RULES

        if self.threshold_rule not in THRESHOLD_CHOICES:
            raise ConfigError(f"--threshold-rule {self.threshold_rule!r}: allowed: {', '.join(THRESHOLD_CHOICES)}",
                              source="--threshold-rule")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"--quantize {self.quantize!r}: allowed: {', '.join(QUANTIZE_CHOICES)}",
                              source="--quantize")
        for flag, value in (("--tta", self.tta), ("--ensemble", self.ensemble)):
            if value not in SWITCH_CHOICES:
                raise ConfigError(f"{flag} {value!r}: allowed: {', '.join(SWITCH_CHOICES)}", source=flag)
        if self.select not in SELECTION_RULES:
            raise ConfigError(f"unknown selection rule {self.select!r}; use one of {SELECTION_RULES}",
                              source="--select")
        if self.threshold_rule == "bayes" and self.prevalence is None:
            raise ConfigError("--threshold-rule bayes needs --prevalence P (the clinic's share of positives)",
                              source="--threshold-rule")
        if self.prevalence is not None and not 0 < self.prevalence < 1:
            raise ConfigError(f"--prevalence {self.prevalence} must be a share of positives in (0, 1), e.g. 0.3",
                              source="--prevalence")
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


@dataclass
class Plan:
    """What promote reads before it decides: the run, its data and eligible trials, the rules in force."""

    cfg: PromoteConfig
    store: RunStore
    run: RunRecord
    sites: list                # the run's sites (raycxr.sites.Site), possibly none
    select: str                # the selection rule in force: shift-auc | val-auc | site
    threshold_rule: str        # the exported operating point's rule ("auto" resolved)
    data_dir: str | Path
    manifest: Manifest
    history: RunHistory
    eligible: list[dict]       # leaderboard rows with a validation figure and a checkpoint in storage

    @property
    def on(self) -> str:
        """The films that choose: the sites' site-val films for ``--select site``, else validation."""
        return "site-val" if self.select == "site" else "validation"


def plan(cfg: PromoteConfig) -> Plan:
    """Read the run and check it can be promoted as asked (its data here, a trial to promote)."""
    from raycxr.data import has_manifest, location, read_manifest
    from raycxr.runs import RunRecord, run_history

    store = RunStore(cfg.run)
    store.require_run("--run")
    run = RunRecord.load(store)
    sites = run.site_records()
    select = cfg.select if cfg.select != "auto" else "site" if sites else "shift-auc"
    if select == "site" and not sites:
        raise ConfigError("--select site needs a search with the deploying site's films (raycxr search --site DATA); "
                          f"{run.name} had none: search again with --site, or use --select shift-auc", source="--select")
    # a site's films say its prevalence: the fewest errors there; otherwise the balanced point
    rule = cfg.threshold_rule if cfg.threshold_rule != "auto" else "accuracy" if select == "site" else "youden"
    data_dir = location(cfg.data or run.data)
    if not has_manifest(data_dir):
        raise ConfigError(f"the search read its data from {data_dir}, which is not here: pass --data with this "
                          "machine's copy of that dataset (its fingerprint must match)", source="--data")
    manifest = read_manifest(data_dir)
    if manifest.fingerprint != run.data_fingerprint:
        raise DataError(f"{data_dir} is not the dataset the search used (fingerprint {manifest.fingerprint} != "
                        f"{run.data_fingerprint}): promote against the dataset the search used")
    history = run_history(store.uri)
    eligible = [r for r in history.board
                if r["status"].startswith("ok") and r.get("checkpoint") and exists(r["checkpoint"])]
    if not eligible:
        raise NoEligibleTrialError(f"no trial of {store.uri} has a validation AUC and a checkpoint in storage: "
                                   "run a search that finishes at least one epoch")
    return Plan(cfg=cfg, store=store, run=run, sites=sites, select=select, threshold_rule=rule, data_dir=data_dir,
                manifest=manifest, history=history, eligible=eligible)


@dataclass(frozen=True)
class Operating:
    """Calibration, the operating points and the exported threshold, fixed on the selection films."""

    calibration: dict
    points: dict               # raycxr.metrics.operating_points
    rule: str                  # the exported point's name
    sel_p: np.ndarray          # calibrated P(target) of the selection films
    validation: dict           # binary_metrics of the selection films at the threshold (in-sample)
    internal_validation: dict | None  # the same on internal validation, when a site's films chose

    @property
    def threshold(self) -> float:
        return self.points[self.rule]["threshold"]

    @property
    def stability(self) -> dict:
        pt = self.points[self.rule]
        return pt["stability"] or {"how": pt["how"], "unstable": False}

    @property
    def shift(self) -> float:
        """The logit offset a stated prevalence folds into the probabilities (raycxr.metrics.bias_shift)."""
        from raycxr.metrics import bias_shift

        return bias_shift(self.calibration)


def operate(sel: SplitArrays, sel_z: np.ndarray, *, val_y: np.ndarray, val_z: np.ndarray, site: bool, rule: str,
            cfg: PromoteConfig, on: str) -> Operating:
    """Platt calibration (on internal validation logits ``val_z``; refitted on the site's films when
    ``site`` and they hold enough events), a stated prevalence, and every operating point on the
    selection films ``sel`` (their logits ``sel_z``). Pure: logits in, decisions out."""
    from raycxr.metrics import (bias_shift, binary_metrics, calibrate_logits, fit_calibration, fit_site_calibration,
                                operating_points, prior_shift)
    from raycxr.sites import MIN_EVENTS

    calibration = fit_calibration(val_y, val_z)
    if site:
        calibration = fit_site_calibration(sel.y, sel_z, internal=calibration, min_events=MIN_EVENTS)
    if cfg.prevalence is not None:
        calibration = prior_shift(calibration, fitted_prevalence=float(sel.y.mean()),
                                  target_prevalence=cfg.prevalence)
    sel_p = calibrate_logits(sel_z, calibration)
    points = operating_points(sel.y, sel_p, sel.groups, target_sensitivity=cfg.target_sensitivity,
                              target_specificity=cfg.target_specificity, bayes=cfg.prevalence is not None,
                              accuracy=site or rule == "accuracy", seed=cfg.seed, on=on)
    threshold, shift = points[rule]["threshold"], bias_shift(calibration)
    # Brier and ECE at each split's own prevalence: --prevalence moves the probabilities served and the
    # PPV/NPV quoted at it, never the calibration figures (raycxr.metrics.binary_metrics)
    internal = (binary_metrics(val_y, calibrate_logits(val_z, calibration), threshold=threshold, prior_shift=shift)
                if site else None)
    return Operating(calibration=calibration, points=points, rule=rule, sel_p=sel_p,
                     validation=binary_metrics(sel.y, sel_p, threshold=threshold, prior_shift=shift),
                     internal_validation=internal)


@dataclass(frozen=True)
class Choice:
    """Everything promote decides on the selection films, before a test film is read."""

    rows: list[dict]           # the chosen leaderboard rows (an ensemble's members)
    selection: dict            # the selection record for the card (rule, kind, why, on, finalists...)
    model: object              # the network to export and score (TTA-wrapped when TTA was kept)
    spec: ModelSpec
    ensemble_state: dict | None  # an ensemble's weights to save; None for one trial (its checkpoint is copied)
    tta: dict
    op: Operating
    sel: SplitArrays           # the films that chose
    val: SplitArrays           # internal validation

    @property
    def trial_ids(self) -> str:
        return "+".join(r["trial_id"] for r in self.rows)

    @property
    def on(self) -> str:
        """The films that chose: ``validation`` or ``site-val``."""
        return self.selection["on"]


def choose(p: Plan) -> Choice:
    """The model (one trial or an ensemble), test-time augmentation, calibration and the operating
    points, all on validation (or the sites' site-val films) only."""
    cfg = p.cfg
    val = split_arrays(p.data_dir, "val", p.run.target)
    sel = _site_part(p.sites, "site-val", p.run.target) if p.select == "site" else val
    log.info("promote 1/4: choosing the model, threshold and calibration on %s (%d eligible trials)", p.on,
             len(p.eligible))
    rows, selection = _select(cfg, p.eligible, sel, rule=p.select)
    selection["on"] = p.on
    core, spec, ensemble_state = _build(rows)
    sel_z = target_logits(core, spec, sel.images, progress=f"scoring {p.on}")
    model, sel_z, tta = _choose_tta(core, spec, sel, sel_z, mode=cfg.tta, n_boot=cfg.n_boot, seed=cfg.seed)
    site = p.select == "site"
    val_z = target_logits(model, spec, val.images, progress="scoring validation") if site else sel_z
    op = operate(sel, sel_z, val_y=val.y, val_z=val_z, site=site, rule=p.threshold_rule, cfg=cfg, on=p.on)
    if op.stability["unstable"]:
        log.warning("the %s threshold is unstable: %s", p.on, op.stability["how"])
    return Choice(rows=rows, selection=selection, model=model, spec=spec, ensemble_state=ensemble_state, tta=tta,
                  op=op, sel=sel, val=val)


@dataclass(frozen=True)
class Scored:
    """One read of test films: the films, their calibrated probabilities, the report, earlier reads."""

    films: SplitArrays
    p: np.ndarray
    metrics: dict              # raycxr.metrics.report at the exported threshold
    earlier: list[dict]        # the earlier reads of these films (raycxr.ledger.log_read)


def score_once(p: Plan, c: Choice, part: str, *, out: Path, final: Path) -> Scored:
    """Read ``part`` (``holdout``, or the sites' ``site-test`` films) once: logged before it is read in
    the run's and the films' ledgers (:func:`raycxr.ledger.log_read`), then scored with the choice."""
    from raycxr.ledger import Films, log_read, split_digest
    from raycxr.metrics import calibrate_logits, report

    if part == "holdout":
        films = [Films(p.data_dir, p.manifest.fingerprint, "holdout", split_digest(p.data_dir, "holdout"))]
    else:
        films = [Films(s.data, s.fingerprint, "site-test", s.digest["site-test"], site=s.name) for s in p.sites]
    earlier = log_read(films, store=p.store, by="promote", run=p.run.name, trial_id=c.trial_ids,
                       out=str(final.resolve()))
    log.info("promote 2/4: scoring the %s, once", "holdout" if part == "holdout" else "site-test films")
    arrays = (split_arrays(p.data_dir, "holdout", p.run.target) if part == "holdout"
              else _site_part(p.sites, "site-test", p.run.target))
    prob = calibrate_logits(target_logits(c.model, c.spec, arrays.images, progress="scoring the holdout" if part == "holdout" else "scoring site-test"),
                            c.op.calibration)
    write_predictions(out / f"{part.replace('-', '_')}_predictions.csv", sources=arrays.sources,
                      groups=arrays.groups, y=arrays.y, probabilities=prob)
    metrics = report(arrays.y, prob, groups=arrays.groups, sources=arrays.sources, threshold=c.op.threshold,
                     prior_shift=c.op.shift, n_boot=p.cfg.n_boot, seed=p.cfg.seed)
    return Scored(films=arrays, p=prob, metrics=metrics, earlier=earlier)


def at_points(points: dict, y: np.ndarray, prob: np.ndarray, *, sel: tuple | None = None,
              prevalence: float | None = None) -> dict:
    """Sensitivity, specificity, PPV, NPV and accuracy of ``prob`` at each operating point; with
    ``sel`` (labels, probabilities of the films that chose), their in-sample sensitivity and
    specificity beside; with ``prevalence``, PPV and NPV at it."""
    from raycxr.metrics import binary_metrics, predictive_values

    table = {}
    for name, pt in points.items():
        m = binary_metrics(y, prob, threshold=pt["threshold"])
        row = {"threshold": pt["threshold"]}
        if sel is not None:
            v = binary_metrics(*sel, threshold=pt["threshold"])
            row.update(target=pt["target"], how=pt["how"])
        row.update({k: m[k] for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")})
        if sel is not None:
            row.update(val_sensitivity=v["sensitivity"], val_specificity=v["specificity"])
        if prevalence is not None:
            row["ppv_at_prevalence"], row["npv_at_prevalence"] = predictive_values(
                m["sensitivity"], m["specificity"], prevalence)
        table[name] = row
    return table


def headline(p: Plan, site_test: Scored | None, c: Choice, *, final: Path) -> dict:
    """The card's headline: the sites' site-test figures, or a statement of why there are none."""
    if site_test is not None:
        return {"kind": "site", "split": "site-test",
                # where each site's data is, relative to the model folder like data.dir
                "sites": [{**s.to_dict(), "data": _relative(s.data, final)} for s in p.sites],
                "previously_read": len(site_test.earlier),
                "operating_points": at_points(c.op.points, site_test.films.y, site_test.p),
                "metrics": site_test.metrics}
    if p.sites:
        return {"kind": "none", "statement": (
            f"No site figure: the search had site films ({', '.join(s.name for s in p.sites)}) but this promotion "
            f"chose with --select {p.select}, so site-test was not read. " + NO_SITE_STATEMENT.split(": ", 1)[1])}
    return {"kind": "none", "statement": NO_SITE_STATEMENT}


@dataclass(frozen=True)
class Exports:
    """What the export step wrote and measured."""

    max_abs_diff: dict         # TorchScript and ONNX against the eager model
    latency: dict              # ONNX Runtime latency of each exported ONNX model
    int8: dict | None          # --quantize int8's decision
    serving_onnx: dict | None  # --serving-onnx's export check


def export(p: Plan, c: Choice, hold: Scored, out: Path) -> Exports:
    """Write the promoted model into ``out``: safetensors (the source of truth), TorchScript and ONNX
    checked against it, the serving exports, and ``config.json`` (:class:`PromotedModel`)."""
    from raycxr.serving import model_inputs, serving_exports

    cfg = p.cfg
    log.info("promote 3/4: exports (safetensors, TorchScript, ONNX%s), checked against the model",
             ", serving ONNX" if cfg.serving_onnx else "")
    if c.ensemble_state is None:
        shutil.copyfile(_checkpoint(c.rows[0]) / "model.safetensors", out / "model.safetensors")
    else:
        from safetensors.torch import save_file

        save_file(c.ensemble_state, str(out / "model.safetensors"))
    diffs = _export(c.model, out, model_inputs(c.spec, c.val.images[:16]))
    latencies, int8 = serving_exports(out, c, hold.films, quantize=cfg.quantize, n_boot=cfg.n_boot, seed=cfg.seed)
    promoted = PromotedModel(spec=c.spec, threshold=c.op.threshold, threshold_rule=c.op.rule,
                             calibration=c.op.calibration, class_names=(f"not_{p.run.target}", p.run.target),
                             tta=c.tta["used"], operating_points={k: v["threshold"] for k, v in c.op.points.items()},
                             selection={k: c.selection[k] for k in ("rule", "kind", "why")})
    promoted.save(out)
    serving = None
    if cfg.serving_onnx:
        from raycxr.predict import Model

        served = Model(c.model, promoted, directory=out)  # the network already in memory, as saved
        serving = {**served.export_onnx(out / "model.serving.onnx", check_with=c.val.images[:16]),
                   "path": "model.serving.onnx"}  # relative to the model folder
    return Exports(max_abs_diff=diffs, latency=latencies, int8=int8, serving_onnx=serving)


def card(p: Plan, c: Choice, hold: Scored, site_test: Scored | None, x: Exports, *, final: Path) -> ModelCard:
    """The model card of a promotion, from what was decided, read and exported."""
    from raycxr.serving import trial_like_latency

    spec, board, m = c.spec, p.history.board, p.manifest
    architecture = spec.architecture if c.ensemble_state is None else "ensemble of " + " + ".join(
        f"{mb.architecture}@{mb.image_size}px" for mb in spec.members)
    rows = {id(r): _card_row(r, final) for r in [*c.rows, *board[:5]]}  # checkpoints relative to the model
    return ModelCard(
        run=p.run.name, trial=rows[id(c.rows[0])], members=[rows[id(r)] for r in c.rows], architecture=architecture,
        selection=c.selection, target=p.run.target, threshold=c.op.threshold, threshold_rule=c.op.rule,
        threshold_stability=c.op.stability, calibration=c.op.calibration,
        operating_points=at_points(c.op.points, hold.films.y, hold.p, sel=(c.sel.y, c.op.sel_p),
                                   prevalence=p.cfg.prevalence),
        prevalence=p.cfg.prevalence, tta=c.tta, validation=c.op.validation,
        internal_validation=c.op.internal_validation, headline=headline(p, site_test, c, final=final),
        holdout=hold.metrics, export_max_abs_diff=x.max_abs_diff, holdout_previously_read=len(hold.earlier),
        holdout_earlier_reads=[{k: e.get(k) for k in ("time", "by", "run", "trial_id")} for e in hold.earlier],
        data={"dir": _relative(p.data_dir, final), "fingerprint": m.fingerprint, "counts": m.counts,
              "split_level": m.split_level, "params": m.params},
        search_space=p.run.space_config, versions=p.run.versions, leaderboard_top=[rows[id(r)] for r in board[:5]],
        pareto=[{k: r.get(k) for k in ("trial_id", "model", "image_size", "val_auc", "latency_ms")}
                for r in p.eligible],
        latency=x.latency, int8=x.int8, latency_ms=trial_like_latency(x.latency), external=[],
        serving_onnx=x.serving_onnx, registry=None)


def _promote(cfg: PromoteConfig, *, out: Path, final: Path) -> ModelCard:
    """:func:`promote`'s work, written into ``out`` (the staging folder); ``final`` is where it will be:
    plan, choose on the selection films, then read the holdout (and site-test) once, export, card."""
    from raycxr.card import write_model_card
    from raycxr.report import write_report

    p = plan(cfg)
    c = choose(p)
    hold = score_once(p, c, "holdout", out=out, final=final)
    site_test = score_once(p, c, "site-test", out=out, final=final) if p.select == "site" else None
    x = export(p, c, hold, out)
    log.info("promote 4/4: model card, plots and report")
    made = card(p, c, hold, site_test, x, final=final)
    made.save(out)
    write_model_card(made, out / "model_card.md")
    write_report(out, card=made, holdout_y=hold.films.y, holdout_p=hold.p, frames=p.history.frames,
                 prior_shift=c.op.shift)
    return made


def api(run: str | Path, out: str | Path, **options) -> ModelCard:
    """``raycxr.promote(run, out, **options)``: :func:`promote` with keyword options (the fields
    of :class:`PromoteConfig`, e.g. ``threshold_rule="sensitivity"``); returns the :class:`~raycxr.card.ModelCard`."""
    return promote(PromoteConfig(run=run, out=Path(out), **options))


from raycxr import callable_stage  # noqa: E402  (after api, which it calls)

callable_stage(__name__)
