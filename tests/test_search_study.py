"""The Optuna study raycxr's searcher keeps: the values it learns from are the ones the leaderboard
ranks by, and trials that ASHA stopped are pruned, not complete (tested on the searcher itself; the
study of a real search is compared with its leaderboard in test_cluster's ASHA search)."""

from __future__ import annotations

import optuna
import pytest

from raycxr.samplers import StudySearch, sampler
from raycxr.search import SEARCH_METRIC


def _searcher(tmp_path, metric=SEARCH_METRIC, mode="max"):
    from ray import tune

    s = StudySearch(metric=metric, mode=mode, sampler=sampler("tpe", seed=0, trials=8), max_epochs=3,
                    storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"), study_name="s")
    s.set_search_properties(metric, mode, {"lr": tune.loguniform(1e-4, 1e-1), "model": tune.choice(["a", "b"])})
    return s


def _epochs(s, trial_id, values, **extra):
    """Results as Tune hands them over: every epoch but the last to on_trial_result; the last
    (ASHA's stop, or the final epoch) goes to on_trial_complete alone."""
    assert s.suggest(trial_id) is not None
    for epoch, v in enumerate(values, 1):
        result = {"epoch": epoch, SEARCH_METRIC: v, "training_iteration": epoch, **extra}
        if epoch < len(values):
            s.on_trial_result(trial_id, result)
    return result


def test_stopped_trials_are_pruned_with_their_epochs_and_finished_ones_complete_with_their_best(tmp_path):
    s = _searcher(tmp_path)
    last = _epochs(s, "stopped", [0.6, 0.7])          # ASHA stopped it after epoch 2 of 3
    s.on_trial_complete("stopped", last)
    last = _epochs(s, "done", [0.8, 0.9, 0.9])        # running best: epoch 3 fell to 0.85, best stays 0.9
    s.on_trial_result("done", {**last, "epoch": 2, "reported_again": True, SEARCH_METRIC: 0.1})  # a resume
    s.on_trial_complete("done", last)
    _epochs(s, "crashed", [0.5, 0.55])
    s.on_trial_complete("crashed", None, error=True)

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_id["stopped"].state == optuna.trial.TrialState.PRUNED
    assert by_id["stopped"].intermediate_values == {1: 0.6, 2: 0.7}
    assert by_id["done"].state == optuna.trial.TrialState.COMPLETE and by_id["done"].value == pytest.approx(0.9)
    assert by_id["done"].intermediate_values == {1: 0.8, 2: 0.9, 3: 0.9}
    assert by_id["crashed"].state == optuna.trial.TrialState.FAIL
    # Ray's own OptunaSearch would have told "stopped" COMPLETE with 0.7, an epoch-2 value
    assert [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE] == [pytest.approx(0.9)]


@pytest.mark.parametrize("name", ["tpe", "gp", "cmaes", "random"])
def test_every_searcher_samples_the_space(name):
    import optuna.distributions as d

    study = optuna.create_study(sampler=sampler(name, seed=1, trials=12), direction="maximize")
    space = {"lr": d.FloatDistribution(1e-4, 1e-1, log=True), "model": d.CategoricalDistribution(["a", "b"]),
             "batch": d.IntDistribution(16, 64)}
    for i in range(8):
        t = study.ask(space)
        study.tell(t, -abs(t.params["lr"] - 0.01) + (t.params["model"] == "a"))
    assert len(study.trials) == 8 and all(1e-4 <= t.params["lr"] <= 1e-1 for t in study.trials)


@pytest.mark.parametrize("name, brackets", [("asha", 1), ("hyperband", 3), ("none", 0)])
def test_schedulers(name, brackets):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raycxr.config import parse_space
    from raycxr.search import _scheduler

    space = parse_space({"params": {"model": "test_resnet", "lr": 0.01}, "max_epochs": 8,
                         "scheduler": {"grace_period": 1, "reduction_factor": 2}}, name="s")
    s = _scheduler(name, space=space, max_epochs=8, own_metric=True)
    if not brackets:
        assert type(s) is FIFOScheduler
        return
    assert isinstance(s, ASHAScheduler) and len(s._brackets) == brackets
    # HyperBand's brackets start their rungs later: grace 1, 2, 4 (so more trials run long)
    assert [min(r[0] for r in b._rungs) for b in s._brackets] == [2 ** k for k in range(brackets)]


def test_a_resumed_searcher_older_than_its_study_does_not_fail_a_finished_trial(tmp_path):
    """A driver killed after Optuna wrote a trial's end but before Tune saved the searcher: the
    resumed searcher (its pickle) thinks the trial runs, the study (SQLite) holds it finished, and
    Tune completes it again on resume. Telling Optuna again raised UpdateFinishedTrialError, which
    Tune turned into an errored trial (seen in test_faults' killed-driver resume)."""
    s = _searcher(tmp_path)
    last = _epochs(s, "t", [0.7, 0.8, 0.85])
    s.save(str(tmp_path / "searcher-state.pkl"))  # the searcher as Tune last saved it: the trial running
    s.on_trial_complete("t", last)                # the study records the end; then the driver dies
    resumed = _searcher(tmp_path)
    resumed.restore(str(tmp_path / "searcher-state.pkl"))  # what Tune's restore does
    resumed.on_trial_result("t", {**last, "epoch": 3})  # Tune replays the last result ...
    resumed.on_trial_complete("t", last)                # ... and completes the trial again: no error
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(0.85)
