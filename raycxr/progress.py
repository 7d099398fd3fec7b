"""Progress bars for long stages (tqdm): on a terminal or in a notebook, never in a log file or a
pipe, and never with ``raycxr -q`` (which sets :data:`SHOW` to False)."""

from __future__ import annotations

SHOW = True


def bar(iterable=None, *, show: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, shown when ``show`` and :data:`SHOW` are true and the
    output is a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if show and SHOW else True, **kwargs)
