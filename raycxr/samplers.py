"""Optuna samplers raycxr adds to Optuna's own (see ``search._sampler``). A module of its own so that
a search's searcher state, which Ray Tune saves with pickle, can name their classes."""

from __future__ import annotations

import optuna


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a search that Ray Tune drives: Tune runs exactly the grid's trials
    (``num_samples``), so after the last one there is nothing to stop. Optuna's own would call
    ``study.stop()``, which raises outside ``study.optimize``."""

    def after_trial(self, study, trial, state, values) -> None:
        return None
