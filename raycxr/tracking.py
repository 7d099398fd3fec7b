"""MLflow tracking (optional, ``pip install 'raycxr[mlflow]'``): a search's trials as MLflow runs,
and a promoted model as a new version in the MLflow Model Registry.

- :func:`search_callbacks` (``raycxr search --mlflow URI``): one MLflow run per Tune trial in the
  experiment ``raycxr-NAME``: the trial's hyperparameters as params, each epoch's reported numbers
  as metrics at ``step=epoch``. A resumed search continues each trial's run instead of starting
  another (runs are found again by their ``raycxr.trial_id`` tag).
- :func:`register_model` (``raycxr promote --register NAME``): the promoted folder's files as the
  artifacts of a new run in the same experiment (``promoted/``: download it and ``raycxr predict``
  uses it), the holdout metrics with their 95% CIs, and the ONNX export logged as an MLflow ONNX
  model (``mlflow.onnx.load_model("models:/NAME/VERSION")``) registered as a new version of NAME.

No image file names or per-patient rows reach MLflow: a trial's config holds hyperparameters only,
and a promoted folder is logged by an allow-list (its holdout_predictions.csv, one row per holdout
image with a patient hash, stays out). The model card goes as it is on disk, with the dataset's
folder and the run's checkpoint paths in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ray.tune.callback import Callback

from raycxr.card import ModelCard, fmt
from raycxr.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL = "pip install 'raycxr[mlflow]'"
# A promoted folder's files that go to MLflow, besides its plots (*.png). Not the TorchScript file
# (a pickle-based format) nor holdout_predictions.csv (one row per holdout image).
PROMOTED_FILES = ("model.onnx", "model.safetensors", "config.json", "model_card.md", "model_card.json", "report.html")
OPTIONAL_FILES = ("model.serving.onnx",)  # written by promote --serving-onnx
# Carried inside the registered MLflow model too, so a version holds its own preprocessing and card.
MODEL_EXTRA_FILES = ("config.json", "model_card.md", "model_card.json")
HOLDOUT_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "brier", "ece")
# What Tune adds to every result (time, host, pid, iteration counters): not the trial's own figures.
_TUNE_KEYS = frozenset({"training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore",
                        "timesteps_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
                        "timestamp", "pid", "done", "epoch"})


def experiment_name(run_name: str) -> str:
    """The MLflow experiment of a raycxr run: its trials and every model promoted from it."""
    return f"raycxr-{run_name}"


def search_callbacks(uri: str, *, run_name: str) -> list:
    """Ray Tune callbacks that log each trial of the search ``run_name`` to the MLflow tracking
    server or store at ``uri`` (checked here, before any trial starts)."""
    client = _client(uri)
    _experiment_id(client, experiment_name(run_name), uri=uri)
    return [MLflowTrials(uri, experiment=experiment_name(run_name))]


class MLflowTrials(Callback):
    """A Tune callback: one MLflow run per trial, on the driver.

    Ray's own ``MLflowLoggerCallback`` is not used: it steps metrics by Tune's training iteration
    (a resumed trial would restart at 1, and an epoch reported again would be counted twice), logs
    Tune's bookkeeping (pid, timestamps) as metrics, and starts a second run for a resumed trial.

    Pickled into Tune's ``tuner.pkl`` (a resumed search gets it back): only the URI, without any
    ``user:password@`` (a run folder is shared: no secret goes into it), and the experiment's name
    are kept; the client and the trial-to-run map are rebuilt on use. A resumed search against a
    server that needs a login takes it from MLflow's own ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``). An MLflow
    failure is logged once and ends MLflow logging for the rest of the search, which goes on (the
    run folder holds every result): a slow or down server must not stall or kill a long search.
    """

    def __init__(self, uri: str, *, experiment: str):
        self.uri, self.experiment = uri, experiment
        self._reset()

    def _reset(self) -> None:
        self._client = self._experiment_id = None
        self._runs: dict[str, str] = {}        # trial id -> MLflow run id
        self._epochs: dict[str, set] = {}      # trial id -> epochs logged
        self._failed = False

    def __getstate__(self) -> dict:
        return {"uri": redact(self.uri), "experiment": self.experiment}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard(trial, self._run_of, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guard(trial, self._log_result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard(trial, self._end, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard(trial, self._end, trial, "FAILED")

    def _guard(self, trial, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception as exc:  # MlflowException, a refused connection, a locked SQLite file ...
            self._failed = True
            log.warning("MLflow logging to %s failed for trial %s (%s: %s); the search goes on without it, and "
                        "its run folder keeps every result", redact(self.uri), trial.trial_id, type(exc).__name__,
                        _first_line(exc))

    def _run_of(self, trial) -> str:
        """The MLflow run of a trial: the one this search made, one a resumed search finds by tag, or new."""
        tid = str(trial.trial_id)
        if tid in self._runs:
            return self._runs[tid]
        if self._client is None:
            self._client = _client(self.uri)
            self._experiment_id = _experiment_id(self._client, self.experiment, uri=self.uri)
        found = self._client.search_runs([self._experiment_id], filter_string=f"tags.`raycxr.trial_id` = '{tid}'",
                                         max_results=1)
        if found:  # a resumed search: carry on in the trial's run, without logging an epoch twice
            from raycxr.train import METRIC

            run_id = found[0].info.run_id
            self._client.update_run(run_id, status="RUNNING")
            self._epochs[tid] = {m.step for m in self._client.get_metric_history(run_id, METRIC)}
        else:
            from mlflow.entities import Param

            run_id = self._client.create_run(self._experiment_id, run_name=f"trial_{tid}",
                                             tags={"raycxr.trial_id": tid, "raycxr.kind": "trial"}).info.run_id
            params = [Param(str(k), str(v)) for k, v in sorted(trial.config.items())]
            self._client.log_batch(run_id, params=params)
            self._epochs[tid] = set()
        self._runs[tid] = run_id
        return run_id

    def _log_result(self, trial, result: dict) -> None:
        from mlflow.entities import Metric

        run_id = self._run_of(trial)
        tid = str(trial.trial_id)
        epoch = int(result.get("epoch") or result.get("training_iteration") or 0)
        if epoch in self._epochs[tid]:
            return  # a resumed trial reports its checkpoint's epoch again
        ms = int(1000 * float(result.get("timestamp") or time.time()))
        metrics = [Metric(k, float(v), ms, epoch) for k, v in sorted(result.items())
                   if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)
        self._epochs[tid].add(epoch)

    def _end(self, trial, status: str) -> None:
        run_id = self._run_of(trial)
        self._client.set_terminated(run_id, status=status)


def register_model(model_dir: Path, card: ModelCard, *, uri: str | None, name: str) -> dict:
    """Log the promoted folder ``model_dir`` (its ``card``) to MLflow
    and register its ONNX export as a new version of ``name``. ``uri`` None: $MLFLOW_TRACKING_URI.

    Returns what model_card.json keeps under ``registry``: tracking URI (without credentials),
    experiment, run id, model name, version and the ``models:/`` URI to load it by.
    """
    mlflow = _import_mlflow()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no MLflow tracking URI: pass --mlflow URI (e.g. sqlite:///mlflow.db or "
                          "http://127.0.0.1:5000), or set $MLFLOW_TRACKING_URI", source="--register")
    model_dir = Path(model_dir)
    missing = [f for f in PROMOTED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{model_dir} is not a complete promoted model (missing {', '.join(missing)}): "
                          "promote it again with raycxr promote", source="--register")
    import onnx
    from mlflow.exceptions import MlflowException

    pooled = card.holdout["pooled"]
    metrics = {"threshold": float(card.threshold)}
    for m in HOLDOUT_METRICS:
        low, high = pooled.get("ci95", {}).get(m) or (None, None)
        for key, value in ((f"holdout_{m}", pooled.get(m)), (f"holdout_{m}_ci95_low", low),
                           (f"holdout_{m}_ci95_high", high)):
            if value is not None:  # NaN is logged as NaN (a split with one class has no AUC)
                metrics[key] = float(value)
    params = {"architecture": card.architecture, "target": card.target,
              "threshold_rule": card.threshold_rule, "tta": card.tta["used"],
              "trials": "+".join(str(m["trial_id"]) for m in card.members),
              "holdout_n": pooled.get("n"), "bootstrap_resamples": pooled.get("ci95", {}).get("n_boot_used")}
    experiment = experiment_name(card.run)
    onnx_model = onnx.load(str(model_dir / "model.onnx"))
    with _tracking_uri(mlflow, uri):
        try:
            client = _client(uri)
            exp_id = _experiment_id(client, experiment, uri=uri)
            with mlflow.start_run(experiment_id=exp_id, run_name=f"promote-{name}",
                                  tags={"raycxr.kind": "promoted", "raycxr.run": card.run}) as run:
                mlflow.log_params(params)
                optional = [f for f in OPTIONAL_FILES if (model_dir / f).is_file()]
                for f in [*PROMOTED_FILES, *optional, *sorted(p.name for p in model_dir.glob("*.png"))]:
                    mlflow.log_artifact(str(model_dir / f), artifact_path="promoted")
                info = mlflow.onnx.log_model(
                    onnx_model, name="model", registered_model_name=name, signature=_signature(onnx_model),
                    extra_files=[str(model_dir / f) for f in MODEL_EXTRA_FILES],
                    pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # no inference in a subprocess
                    save_as_external_data=False,  # one model.onnx, as promote wrote it
                    metadata={"raycxr": {"target": card.target, "threshold": float(card.threshold),
                                         "threshold_rule": card.threshold_rule,
                                         "output": "the logit of the target finding, before calibration; "
                                                   "extra_files/config.json holds the input size, "
                                                   "normalisation, calibration and threshold"}})
                mlflow.log_metrics(metrics, model_id=info.model_id)
            version = str(info.registered_model_version)
            client.set_model_version_tag(name, version, "raycxr.run", card.run)
            auc, ci = pooled.get("auc"), pooled.get("ci95", {}).get("auc") or [None, None]
            client.update_model_version(name, version, description=(
                f"{card.architecture} for {card.target} from raycxr run {card.run}: holdout AUC "
                f"{fmt(auc)} (95% CI {fmt(ci[0])}-{fmt(ci[1])}), threshold {fmt(card.threshold)} "
                f"({card.threshold_rule})"))
        except MlflowException as exc:
            raise ConfigError(f"could not register {name!r} at {redact(uri)}: {_first_line(exc)}. The "
                              f"promoted model in {model_dir} is complete; check the URI and that the server is "
                              "up", source="--mlflow") from None
    return {"tracking_uri": redact(uri), "experiment": experiment, "run_id": run.info.run_id, "model_name": name,
            "version": int(version), "model_uri": f"models:/{name}/{version}"}


def _import_mlflow():
    try:
        import mlflow
        import mlflow.onnx  # noqa: F401  (a submodule: not imported by `import mlflow`)
    except ImportError:
        raise ConfigError(f"MLflow is not installed: {INSTALL}", source="--mlflow") from None
    return mlflow


def _client(uri: str):
    """An MlflowClient for ``uri``; a URI MLflow cannot use, or a server that does not answer, is a
    ConfigError now (MLflow itself retries a refused connection for minutes)."""
    _import_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        try:
            urllib.request.urlopen(redact(uri), timeout=10).close()  # urllib takes no user:password@
        except urllib.error.HTTPError:
            pass  # it answered (a login page, a proxy's 404): MLflow's own calls tell the rest
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no MLflow server answers at {redact(uri)} ({getattr(exc, 'reason', exc)}): start "
                              "it (mlflow server --host 127.0.0.1 --port 5000) or fix the URI", source="--mlflow") \
                from None
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise ConfigError(f"MLflow cannot use the tracking URI {redact(uri)}: {_first_line(exc)}",
                          source="--mlflow") from None


def _experiment_id(client, name: str, *, uri: str) -> str:
    """The id of experiment ``name`` at the client's store, created if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name)
            except MlflowException:  # another process created it just now
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
    except MlflowException as exc:
        raise ConfigError(f"cannot use the MLflow tracking URI {redact(uri)}: {_first_line(exc)}. Check the URI "
                          "(sqlite:///FILE.db, a folder, or http://HOST:PORT of a running `mlflow server`)",
                          source="--mlflow") from None
    if found.lifecycle_stage == "deleted":
        raise ConfigError(f"the MLflow experiment {name!r} at {redact(uri)} is deleted: restore it (mlflow "
                          f"experiments restore --experiment-id {found.experiment_id}) or purge it (mlflow gc)",
                          source="--mlflow")
    return found.experiment_id


@contextlib.contextmanager
def _tracking_uri(mlflow, uri: str):
    """MLflow's fluent API (``log_model``) reads a process-wide tracking URI: set it for this block
    only, then put back the caller's (set in code or in $MLFLOW_TRACKING_URI)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None also clears $MLFLOW_TRACKING_URI
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _signature(onnx_model):
    """The MLflow signature of an ONNX graph's inputs and outputs (a dynamic dimension is -1)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    def schema(values):
        return Schema([TensorSpec(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                                  tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim), v.name)
                       for v in values])

    return ModelSignature(inputs=schema(onnx_model.graph.input), outputs=schema(onnx_model.graph.output))


def redact(uri: str) -> str:
    """``uri`` without a user name or password (http://user:secret@host -> http://host)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
