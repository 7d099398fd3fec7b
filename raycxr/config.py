"""Search spaces as validated, frozen data: YAML (bundled in ``search_spaces/``, or any file) -> :class:`SearchSpace`.

A space file looks like::

    description: what this space is for
    trials: 8                  # Tune num_samples
    max_epochs: 6              # each trial's length, ASHA's max_t (one report per epoch)
    seed: 0
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0, trainer: auto}
    scheduler: {grace_period: 1, reduction_factor: 2}
    params:
      model: [resnet10t, resnet18]          # a list: a categorical choice
      image_size: 128                       # a scalar: fixed
      lr: {loguniform: [1.0e-4, 3.0e-3]}    # a distribution
      ...

Every problem in a file is gathered and raised once, as a :class:`ConfigError` naming the key
and the allowed values. This module knows nothing of Ray: ``search.py`` turns a space into Tune
objects in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycxr.errors import ConfigError


_DISTRIBUTIONS = ("choice", "loguniform", "uniform", "randint")
_TOP_KEYS = {"description", "trials", "max_epochs", "seed", "resources", "scheduler", "params", "pretrained",
             "weights_dir"}
_RESOURCE_KEYS = {"workers_per_trial", "cpus_per_worker", "gpus_per_worker", "trainer"}
# How a trial trains: "auto" trains a one-worker trial in Tune's own (reused) trial process and
# a multi-worker one with Ray Train's TorchTrainer (DDP); "ray-train" uses TorchTrainer always.
TRAINERS = ("auto", "ray-train")
_SCHEDULER_KEYS = {"grace_period", "reduction_factor"}


def _models():
    from raycxr.models import list_models

    return list_models()


def _augmentations():
    from raycxr.transforms import AUGMENTATIONS

    return AUGMENTATIONS


def _equalizations():
    from raycxr.transforms import EQUALIZATIONS

    return EQUALIZATIONS


# source_balance's choices (raycxr.train.source_weights gives each its weights)
SOURCE_BALANCES = ("none", "sqrt", "equal")
# param -> (python type, check(value) -> problem or None, default or REQUIRED)
_REQUIRED = object()
PARAMS: dict[str, tuple[type, Any, Any]] = {
    "model": (str, lambda v: None if v in _models() else f"allowed: {', '.join(_models())}", _REQUIRED),
    "lr": (float, lambda v: None if 0 < v < 1 else "must be in (0, 1)", _REQUIRED),
    "image_size": (int, lambda v: None if 16 <= v <= 1024 else "must be in 16..1024 px", None),
    "augment": (str, lambda v: None if v in _augmentations() else f"allowed: {', '.join(_augmentations())}",
                "light"),
    # per-image preprocessing: none, or hist (histogram equalisation). Recorded in the model's spec so
    # validation, promote and predict apply it too. A string, not a bool: PARAMS take int, float, str
    "equalize": (str, lambda v: None if v in _equalizations() else f"allowed: {', '.join(_equalizations())}",
                 "none"),
    "optimizer": (str, lambda v: None if v in ("adamw", "sgd") else "allowed: adamw, sgd", "adamw"),
    "weight_decay": (float, lambda v: None if 0 <= v < 1 else "must be in [0, 1)", 1e-4),
    "batch_size": (int, lambda v: None if 1 <= v <= 4096 else "must be in 1..4096", 32),
    "imbalance": (str, lambda v: None if v in ("none", "pos_weight") else "allowed: none, pos_weight", "pos_weight"),
    "label_smoothing": (float, lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)", 0.0),
    "warmup_epochs": (float, lambda v: None if 0 <= v <= 10 else "must be in 0..10", 0.0),
    "drop_rate": (float, lambda v: None if 0 <= v < 1 else "must be in [0, 1)", 0.0),
    # weight EMA (timm's ModelEmaV3 with decay warm-up); validation and checkpoints use the average
    "ema_decay": (float, lambda v: None if v == 0 or 0.9 <= v < 1 else "must be 0 (off) or in [0.9, 1)", 0.0),
    # mixup's Beta(alpha, alpha) parameter; 0 turns mixup off
    "mixup": (float, lambda v: None if 0 <= v <= 2 else "must be in 0..2 (0: off)", 0.0),
    # where a trial's starting weights come from (raycxr.models.create_model): none (from scratch),
    # imagenet (timm's, or weights_dir/MODEL.safetensors offline), tag:..., hf-hub:..., file:...
    "pretrained": (str, lambda v: _check_pretrained(v), "none"),
    # training's autocast (raycxr.precision): auto = bf16 on GPUs and on CPUs with AMX/AVX512-BF16
    # (fp32 for depthwise networks on CPU, which bf16 does not speed up); validation scores in fp32
    "precision": (str, lambda v: None if v in ("auto", "fp32", "bf16") else "allowed: auto, fp32, bf16", "auto"),
    # how a pooled train split's sources share each epoch (raycxr.train.source_weights): none (each
    # row once), sqrt (shares proportional to sqrt(rows)) or equal (each source 1/S of the epoch);
    # rows of a rare source are repeated, of a large one thinned, keeping about as many rows per epoch
    "source_balance": (str, lambda v: None if v in SOURCE_BALANCES else f"allowed: {', '.join(SOURCE_BALANCES)}",
                       "none"),
}

# The hyperparameters a trial reports, in the order tables show them: the leaderboard, each
# checkpoint's trial.json and the model card all derive from PARAMS, so adding one is one edit.
HYPERPARAMETERS = tuple(PARAMS)


def _check_pretrained(v):
    from raycxr.models import check_pretrained

    return check_pretrained(v)


@dataclass(frozen=True)
class Param:
    """One hyperparameter: a fixed value, a choice, or a numeric distribution."""

    kind: str  # "value" or one of _DISTRIBUTIONS
    values: tuple


@dataclass(frozen=True)
class SearchSpace:
    name: str
    params: dict[str, Param]
    description: str = ""
    trials: int = 4
    max_epochs: int = 2
    seed: int = 0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    trainer: str = "auto"
    grace_period: int = 1
    reduction_factor: int = 2
    pretrained: bool = False
    weights_dir: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def values_of(self, key: str) -> list:
        """Every value ``key`` can take where that is a finite set (choice or fixed)."""
        p = self.params[key]
        return list(p.values) if p.kind in ("value", "choice") else []


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _num(v, typ):
    if typ is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if typ is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, typ)


def _parse_param(key: str, spec, problems: list[str]) -> Param | None:
    typ, check, _ = PARAMS[key]

    def ok(value, where):
        if not _num(value, typ):
            problems.append(f"params.{key}{where}: {value!r} is not {_TYPE_NAMES[typ]}")
            return False
        if (msg := check(value)) is not None:
            problems.append(f"params.{key}{where}: {value!r} is invalid; {msg}")
            return False
        return True

    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict):
        return Param("value", (typ(spec),)) if ok(spec, "") else None
    if len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
        problems.append(f"params.{key}: {spec!r} must be a value, a list, or one of "
                        f"{{{', '.join(d + ': ...' for d in _DISTRIBUTIONS)}}}")
        return None
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        problems.append(f"params.{key}.{kind}: needs a non-empty list")
        return None
    if kind != "choice":
        if typ is str or len(values) != 2:
            problems.append(f"params.{key}.{kind}: needs [low, high] for a numeric parameter")
            return None
        if kind == "randint" and typ is not int:
            problems.append(f"params.{key}.randint: {key} is {_TYPE_NAMES[typ]}; use uniform or loguniform")
            return None
        if kind != "randint" and typ is int:
            problems.append(f"params.{key}.{kind}: {key} is an integer; use randint or a list of values")
            return None
        if not all(ok(v, f".{kind}") for v in values):
            return None
        if values[0] >= values[1]:
            problems.append(f"params.{key}.{kind}: low {values[0]} must be below high {values[1]}")
            return None
        if kind == "loguniform" and values[0] <= 0:
            problems.append(f"params.{key}.loguniform: low must be > 0")
            return None
        return Param(kind, tuple(typ(v) for v in values))
    if not all([ok(v, f".choice[{i}]") for i, v in enumerate(values)]):
        return None
    return Param("choice", tuple(typ(v) for v in values))


def _section(raw: dict, name: str, keys: set, problems: list) -> dict:
    sec = raw.get(name) or {}
    if not isinstance(sec, dict):
        problems.append(f"{name}: must be a mapping with keys {', '.join(sorted(keys))}")
        return {}
    for k in sorted(set(sec) - keys, key=str):  # YAML keys need not be strings (on: is True)
        problems.append(f"{name}.{k}: unknown key; allowed: {', '.join(sorted(keys))}")
    return sec


def parse_space(raw: dict, *, name: str) -> SearchSpace:
    """Validate a space's YAML mapping; raise one ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError("the file must hold a YAML mapping", source=f"search space {name}")
    for k in sorted(set(raw) - _TOP_KEYS, key=str):
        problems.append(f"{k}: unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    res = _section(raw, "resources", _RESOURCE_KEYS, problems)
    sched = _section(raw, "scheduler", _SCHEDULER_KEYS, problems)
    scalars = {
        "trials": (raw.get("trials", 4), int, 1, 10_000),
        "max_epochs": (raw.get("max_epochs", 2), int, 1, 1_000),
        "seed": (raw.get("seed", 0), int, 0, 2**31 - 1),
        "resources.workers_per_trial": (res.get("workers_per_trial", 1), int, 1, 1024),
        "resources.cpus_per_worker": (res.get("cpus_per_worker", 1), float, 0.1, 256),
        "resources.gpus_per_worker": (res.get("gpus_per_worker", 0), float, 0, 16),
        "scheduler.grace_period": (sched.get("grace_period", 1), int, 1, 1_000),
        "scheduler.reduction_factor": (sched.get("reduction_factor", 2), int, 2, 100),
    }
    for key, (value, typ, lo, hi) in scalars.items():
        if not _num(value, typ) or not lo <= value <= hi:
            problems.append(f"{key}: {value!r} must be {_TYPE_NAMES[typ]} in {lo}..{hi}")
    if res.get("trainer", "auto") not in TRAINERS:
        problems.append(f"resources.trainer: {res.get('trainer')!r} must be one of {', '.join(TRAINERS)} (auto: "
                        "a one-worker trial trains in Tune's own process, several workers use Ray Train)")
    if not isinstance(raw.get("pretrained", False), bool):
        problems.append("pretrained: must be true or false (or search it: params.pretrained: [none, imagenet])")
    if raw.get("weights_dir") is not None and not isinstance(raw["weights_dir"], str):
        problems.append("weights_dir: must be a folder path holding MODEL.safetensors files (timm weights, offline)")

    params_raw = raw.get("params")
    params: dict[str, Param] = {}
    if not isinstance(params_raw, dict):
        problems.append(f"params: required mapping of hyperparameters; allowed keys: {', '.join(PARAMS)}")
        params_raw = {}
    for key, spec in params_raw.items():
        if key not in PARAMS:
            problems.append(f"params.{key}: unknown hyperparameter; allowed: {', '.join(PARAMS)}")
            continue
        if (p := _parse_param(key, spec, problems)) is not None:
            params[key] = p
    if raw.get("pretrained") is True and "pretrained" not in params_raw:
        params["pretrained"] = Param("value", ("imagenet",))  # the older top-level switch
    for key, (_, _, default) in PARAMS.items():
        if key in params_raw or key in params:
            continue
        if default is _REQUIRED:
            problems.append(f"params.{key}: required")
        elif default is not None:
            params[key] = Param("value", (default,))
    mx, grace = raw.get("max_epochs", 2), sched.get("grace_period", 1)
    if _num(mx, int) and _num(grace, int) and grace > mx:
        problems.append(f"scheduler.grace_period: {sched.get('grace_period')} exceeds max_epochs {mx}")
    if problems:
        raise ConfigError(problems, source=f"search space {name}")
    return SearchSpace(
        name=name, params=params, description=str(raw.get("description", "")),
        trials=raw.get("trials", 4), max_epochs=raw.get("max_epochs", 2), seed=raw.get("seed", 0),
        workers_per_trial=res.get("workers_per_trial", 1), cpus_per_worker=float(res.get("cpus_per_worker", 1)),
        gpus_per_worker=float(res.get("gpus_per_worker", 0)), trainer=res.get("trainer", "auto"),
        grace_period=sched.get("grace_period", 1),
        reduction_factor=sched.get("reduction_factor", 2), pretrained=raw.get("pretrained", False),
        weights_dir=raw.get("weights_dir"), raw=raw)


def _bundled():
    """The bundled search spaces: the checkout's top-level ``search_spaces/``, which the build maps
    into the package as ``raycxr.search_spaces`` (pyproject.toml). Read with importlib.resources, so
    a wheel and an editable install find the same files."""
    from importlib.resources import files

    return files("raycxr.search_spaces")


def list_spaces() -> list[str]:
    """Names of the bundled search spaces (``--space NAME``)."""
    return sorted(f.name[:-5] for f in _bundled().iterdir() if f.name.endswith(".yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a bundled space by name (``demo``, ``cpu``, ...) or any YAML file by path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix and len(path.parts) == 1:
        bundled = _bundled() / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise ConfigError(f"no bundled search space {name_or_path!r}: give a YAML path or one of: "
                              f"{', '.join(list_spaces())}", source="--space")
        name, source, size, read = path.name, f"bundled search space {name_or_path}", None, bundled.read_bytes
    else:
        if not path.is_file():
            raise ConfigError(f"no search space file {str(name_or_path)!r}: give a YAML path or one of the bundled "
                              f"names: {', '.join(list_spaces())}", source="--space")
        name, source, size, read = path.stem, f"search space {path}", path.stat().st_size, path.read_bytes
    if size is not None and size > MAX_SPACE_BYTES:
        raise ConfigError(f"{size} bytes: a search space is a few hundred bytes; at most "
                          f"{MAX_SPACE_BYTES} are read", source=source)
    try:
        raw = yaml.load(read().decode("utf-8"), Loader=_loader())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start}): save the file as UTF-8", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from exc
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar PyYAML recognises but cannot build, e.g. `0b_`
        raise ConfigError(f"not valid YAML: a value could not be read ({exc}); quote it if it is text",
                          source=source) from None
    except RecursionError:
        raise ConfigError("nested too deeply to be a search space", source=source) from None
    return parse_space(raw, name=name)


MAX_SPACE_BYTES = 64 * 1024


def _loader():
    """PyYAML's safe loader without aliases: ``*name`` lets a few hundred bytes expand into
    gigabytes (a "billion laughs" file), and a search space never needs one."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a search space; "
                                                  "write the value out", mark)
            return super().compose_node(parent, index)

    return NoAliases
