"""raycxr: Ray-distributed hyperparameter search and model selection for chest X-ray classification.

The pipeline, one module per stage:
files on disk -> ``ingest`` (Parquet shards) -> ``search`` (Ray Tune over Ray Train trials)
-> ``promote`` (holdout once, exports, model card) -> ``predict``.

The Python API (what the ``raycxr`` command calls; each returns data and prints nothing):

    import raycxr
    summary = raycxr.ingest({"kermany": "chest_xray"}, "data", image_size=64)
    result = raycxr.search("data", "demo", runs_dir="runs")       # .run, .leaderboard
    card = raycxr.promote(result.run, "model")                     # a raycxr.ModelCard: card.holdout, ...
    model = raycxr.Model.load("model")
    model.predict_proba(["a.dcm", "b.png"]), model.predict(["a.dcm"])

``raycxr.ingest``, ``raycxr.search`` and ``raycxr.promote`` are the stage modules themselves,
callable (their ``__call__`` is the stage's keyword API: see each module's ``api``). Modules load
when first used, so ``import raycxr`` is quick.
"""

import importlib
import sys
import types

__version__ = "0.1.0"
__all__ = ["Model", "ModelCard", "ingest", "search", "promote", "__version__"]


class _Stage(types.ModuleType):
    """A stage module that can be called: ``raycxr.search(data, space)`` is ``raycxr.search.api(...)``."""

    def __call__(self, *args, **kwargs):
        return self.api(*args, **kwargs)


def callable_stage(name: str) -> None:
    """Make the module ``name`` (one that defines ``api``) callable; each stage module calls this."""
    sys.modules[name].__class__ = _Stage


def __getattr__(name: str):
    if name in ("ingest", "search", "promote"):  # a stage not imported yet
        return importlib.import_module(f"raycxr.{name}")
    if name == "Model":
        from raycxr.predict import Model

        return Model
    if name == "ModelCard":
        from raycxr.card import ModelCard

        return ModelCard
    raise AttributeError(f"module 'raycxr' has no attribute {name!r}")
