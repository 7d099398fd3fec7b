"""The search's searchers: which Optuna sampler (:func:`sampler`), the grid a ``--searcher grid`` walks
(:func:`grid_of`), and :class:`StudySearch`, Ray Tune's ``OptunaSearch`` as raycxr drives it. Classes
live at module level so that a search's searcher state, which Ray Tune saves with pickle, can name them."""

from __future__ import annotations

import logging
import math
import warnings

import optuna
from ray.tune.search.optuna import OptunaSearch

from raycxr.config import SearchSpace
from raycxr.errors import ConfigError

log = logging.getLogger(__name__)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a search that Ray Tune drives: Tune runs exactly the grid's trials
    (``num_samples``), so after the last one there is nothing to stop. Optuna's own would call
    ``study.stop()``, which raises outside ``study.optimize``."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_of(space: SearchSpace) -> dict[str, list]:
    """The grid ``--searcher grid`` walks: each searched parameter's choices. A numeric
    distribution has no grid: ConfigError naming it and what to write instead."""
    ranged = sorted(k for k, p in space.params.items() if p.kind not in ("value", "choice"))
    if ranged:
        raise ConfigError([f"params.{k}: a grid needs a list of values, not a {space.params[k].kind} range "
                           f"(write e.g. {k}: [a, b, c])" for k in ranged],
                          source=f"search space {space.name} for --searcher grid")
    return {k: list(p.values) for k, p in space.params.items() if p.kind == "choice"}


def sampler(name: str, *, seed: int, trials: int, grid: dict[str, list] | None = None):
    """The Optuna sampler named ``name``. The model-based ones start modelling after a quarter of
    the trials (3 to 10) instead of Optuna's fixed 10, which would leave a short search random.
    CMA-ES samples categorical parameters (model, augment, ...) independently at random, as Optuna's
    CmaEsSampler does; it models only the numeric ones. ``grid`` (for "grid": :func:`grid_of`)
    is walked in an order shuffled by ``seed``, each combination once."""
    if name == "grid":
        return GridSampler(grid, seed=seed)

    startup = min(10, max(3, trials // 4))
    with warnings.catch_warnings():  # GP and CMA-ES are "experimental" in Optuna's wording
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, told what raycxr selects by (:data:`raycxr.search.SEARCH_METRIC`), with two corrections, so that the study Optuna models (and that
    ``optuna-dashboard`` shows) holds the values the leaderboard ranks by:

    - intermediate values are reported per *epoch* (a resumed trial keeps its true step; the
      epoch a resumed trial reports again is not reported twice);
    - a trial that ends before ``max_epochs`` without an error (ASHA stopped it, or the time
      budget) is told *pruned*, with its intermediate values, not *complete* with an early
      epoch's value as if that were its final score (Ray's behaviour): a TPE model that mixed
      fidelities so would learn that short trials are the good ones, or the bad ones.
    Each Optuna trial carries its Tune trial id (user attribute ``tune_trial_id``).
    """

    FIGURES = ("val_auc", "val_loss", "site_auc", "site_loss", "worst_source_auc")

    def __init__(self, *, max_epochs: int, **kw):
        super().__init__(**kw)
        self._max_epochs = max_epochs
        self._reported: dict[str, set] = {}  # epochs told to Optuna, per trial

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def _finished_in_study(self, trial_id) -> bool:
        """Whether the study already holds the trial as finished: a driver killed after Optuna
        wrote a trial's end but before Tune saved this searcher leaves a resumed searcher that
        still thinks it runs (the study's copy is the later one; telling it again would fail)."""
        trial = self._ot_trials[trial_id]
        if trial.storage.get_trial(trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id, result):
        if (isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials
                or result.get("reported_again") or self._finished_in_study(trial_id)):
            return
        value, epoch = result.get(self.metric), int(result.get("epoch") or 0)
        reported = self._reported.setdefault(trial_id, set())
        if value is not None and not math.isnan(value) and epoch not in reported:
            self._ot_trials[trial_id].report(float(value), epoch)
            reported.add(epoch)
        # the per-epoch figures beside the one optimised, as the study's user attributes
        # (optuna-dashboard shows them): {"1": 0.93, "2": 0.95, ...} per figure
        trial = self._ot_trials[trial_id]
        for name in self.FIGURES:
            v = result.get(name)
            if isinstance(v, (int, float)) and not math.isnan(v) and epoch:
                trial.set_user_attr(name, {**trial.user_attrs.get(name, {}), str(epoch): float(v)})

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or self._finished_in_study(trial_id):
            return
        if result:  # Tune hands a trial's last result (ASHA's stop, the final epoch) to this alone
            self.on_trial_result(trial_id, result)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics] if result else [None]
        done = bool(result) and int(result.get("epoch") or 0) >= self._max_epochs
        usable = not error and bool(result) and not any(v is None or math.isnan(v) for v in values)
        state, told = optuna.trial.TrialState.FAIL, None  # an error, or no usable score (one class in val)
        if usable and done:
            state, told = optuna.trial.TrialState.COMPLETE, values if len(values) > 1 else values[0]
        elif usable:
            state = optuna.trial.TrialState.PRUNED
        try:
            self._ot_study.tell(self._ot_trials[trial_id], told, state=state)
        except Exception as exc:  # Optuna refuses e.g. a pruned multi-objective trial's values
            log.warning("the Optuna study did not take trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
