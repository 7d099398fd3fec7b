"""Where a search runs: joining a Ray cluster (or starting a local Ray) and sizing trials to it.

:func:`init_ray` starts or joins Ray the way a search needs it (the dashboard's state API on, the
job's processes told which cluster is theirs, token authentication on a joined cluster);
:func:`plan_resources` turns a space's resources and the cluster's capacity (what is free, what an
autoscaler can add) into per-trial resources and a concurrency, or a ConfigError saying why a
trial can never fit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raycxr.config import SearchSpace
from raycxr.errors import ConfigError

log = logging.getLogger(__name__)

# Each Train worker asks for this much less than cpus_per_worker, so that the drivers of up to
# ten trials (Tune places them before their workers, often on one node) never leave a node a
# sliver short of a whole worker: N trials still fill N cores, and no trial waits on its own driver.
_WORKER_CPU_SLACK = 0.01


def init_ray(*, address: str | None, num_cpus: int | None = None, worker_logs: bool = False):
    """Join a cluster (``address`` or $RAY_ADDRESS) or start a local Ray; return its context.

    The local dashboard is always on (bound to 127.0.0.1): besides showing trials, it serves
    the state API that Ray Train's placement-group cleaner polls. Without it, the resources of a
    trial stopped early by ASHA are never released and the next trial waits forever.

    Every process of the search (Tune's trials, Ray Train's controller and its detached
    placement-group cleaner) is told which cluster is its own through the job's runtime
    environment (``RAY_API_SERVER_ADDRESS`` for a local Ray, ``RAY_ADDRESS`` for a joined one).
    Left to find it themselves, Ray's helpers scan the host for Ray processes and fail with
    "Found multiple active Ray instances" as soon as a second Ray runs on the machine; the
    finished trials' placement groups then leak and later trials wait for ever.

    ``worker_logs``: print what the Ray workers print (trial processes, Ray Data, Ray Train) on the
    driver's console (``-v``); off by default, as their errors reach the driver through Tune anyway.
    Applies when this call starts or joins Ray, not to a Ray already initialised in this process.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's per-epoch progress bars, printed by every trial's workers and dataset
    # coordinators, reach the driver's output as broken lines between Tune's status tables, which
    # already show the search's progress. RAY_DATA_DISABLE_PROGRESS_BARS=0 brings them back.
    if os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1") != "0":
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    # Fail rather than wait forever when workers cannot be placed (see docs/notes on Ray 2.60): soon
    # on this machine; on a joined cluster only after a cloud node has had time to boot for them.
    # Read by Ray Train's controller, so it travels in the job's environment (below), not only here.
    start_timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600" if address else "120")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = start_timeout
    # The trials' own processes iterate the datasets too: they get the same progress-bar setting.
    job_env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": start_timeout,
               "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]}
    # Save Tune's experiment state every 2 s (default: every 10 s or more), so a killed driver
    # loses at most that much bookkeeping; a finished trial restarted by --resume finds its last
    # checkpoint at the final epoch and trains nothing.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Keeping one checkpoint per trial makes Tune save its state after every trial checkpoint (so
    # that a resume never looks for a deleted one), and warn each time that it does: by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs: dict[str, Any] = {"log_to_driver": worker_logs, "logging_level": logging.WARNING}
    if address:
        ctx = _join(address, kwargs, job_env)
    else:
        # "local": a new Ray of our own, never a cluster that /tmp/ray/ray_current_cluster still
        # names after it crashed (ray.init would wait for that dead cluster forever). The dashboard
        # port is chosen here so that the job's processes can be told it before they start.
        # Only through the job's runtime environment, never this process's own: a subprocess the
        # driver starts later (another search, a test's cluster) must not inherit this cluster's address.
        # Ray 2.60 starts a local cluster with token authentication (a token made in
        # ~/.ray/auth_token when the user has none): the dashboard and its Jobs API, which run code,
        # answer only a caller with the user's token, not every account on the machine.
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
            log.warning("RAY_AUTH_MODE=%s: this search's Ray dashboard and Jobs API on 127.0.0.1 accept any local "
                        "user, who can run code as you through them; unset it to keep Ray's token auth",
                        os.environ["RAY_AUTH_MODE"])
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, runtime_env={"env_vars": {**job_env, "RAY_API_SERVER_ADDRESS": api}}, **kwargs)
    if address:
        _pin_data_singletons()
    if getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    return ctx


def _pin_data_singletons() -> None:
    """Create Ray Data's two detached singleton actors (its stats actor and autoscaling
    coordinator) on this driver's node (the head, for a job) before any trial does.

    Ray Data pins each to the node of whichever process first asks for it; left to a trial's
    dataset coordinator on a worker, they keep that worker busy for ever, and the autoscaler never
    removes it (a GPU node billed after the search ends). Ray-internal calls: if they move, the
    search still runs, only the pinning is lost.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as exc:
        log.warning("could not place Ray Data's coordinators on this node (%s): an autoscaler may keep the worker "
                    "that holds them", exc)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _token_available() -> bool:
    """Whether this user has a Ray auth token where Ray looks for one ($RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser().is_file()


def _join(address: str, kwargs: dict, job_env: dict):
    """ray.init on an existing cluster, with token authentication the way Ray documents it.

    A head started with ``ray start --head`` where a token exists enforces token auth, but Ray's
    client sends the token only when ``RAY_AUTH_MODE=token`` is set: for a local cluster found
    automatically Ray turns that on when a token exists, for an explicit address it never does.
    raycxr does the same for an explicit address; ``RAY_AUTH_MODE=disabled`` opts out.
    """
    import ray

    from raycxr.errors import RaycxrError

    if os.environ.get("RAY_AUTH_MODE") is None and _token_available():
        # Ray reads RAY_AUTH_MODE into a config cached at import: setting the variable now is not
        # enough. Ray's own helper for a local cluster sets it and refreshes that config.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        log.info("sending this user's Ray auth token to %s (RAY_AUTH_MODE=token)", address)
    # A Ray Client address (ray://) is not what processes inside the cluster connect to; the
    # cluster's own nodes run only that cluster, so there is nothing to pin there.
    env = dict(job_env) if "://" in address or address == "auto" else {**job_env, "RAY_ADDRESS": address}
    try:
        return ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own AuthenticationError
        text = str(exc)
        if "auth" in text.lower() or "token" in text.lower() or os.environ.get("RAY_AUTH_MODE") == "token":
            hint = ("this client sent a Ray auth token (RAY_AUTH_MODE=token): if the head refused it, put the head's "
                    "token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on "
                    "the head prints it")
        else:
            hint = ("is the head running (`ray status` on it) and is its GCS port reachable from here? For a laptop, "
                    "submit the search with `ray job submit` through `ray dashboard cluster.yaml` instead")
        raise RaycxrError(f"could not join the Ray cluster at {address}: {text.splitlines()[0] if text else exc!r}; "
                          f"{hint}") from exc


def cluster_capacity() -> dict:
    """What the cluster has, has free, and can grow to: {"total", "free", "ceiling", "node_cpus",
    "autoscaler"}.

    ``ceiling`` is the autoscaler's maximum (its node types times their max workers, Ray's own
    reading of the cluster config that Ray Data's autoscaler uses too), or None when unknown.
    Autoscaler v2 publishes that config; v1 (the cluster launcher's default in Ray 2.60) does
    not, and only its status says it runs: then ``autoscaler`` is True and ``ceiling`` None.
    ``node_cpus`` is the most CPUs any one node has or can have (as far as is known).
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    node_cpus = max([n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] or [0.0])
    ceiling = None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            ceiling = state.get_max_resources_from_cluster_config() or None
            node_cpus = max([node_cpus] + [g.resources.get("CPU", 0) for g in config.node_group_configs
                                           if g.max_count != 0])
    except Exception as exc:  # an older or stripped Ray without the autoscaler's config: plan from what is up
        log.info("no autoscaler config readable (%s); planning from the nodes up now", exc)
    autoscaler = ceiling is not None
    if not autoscaler:
        try:
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get

            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            # A head started without --autoscaling-config runs a read-only autoscaler that names
            # each node's type after the node ("node_<id>"); a launched cluster's types are its own.
            mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
            autoscaler = any(kind != f"node_{node}" for node, kind in mapping.items())
        except Exception as exc:
            log.info("could not ask whether an autoscaler runs (%s)", exc)
    return {"total": dict(total), "free": dict(free), "ceiling": ceiling, "node_cpus": float(node_cpus),
            "autoscaler": autoscaler}


def plan_resources(space: SearchSpace, *, trials: int, capacity: dict) -> dict:
    """Per-trial resources and concurrency for ``capacity`` (see :func:`cluster_capacity`), or a
    ConfigError saying why a trial can never fit.

    Concurrency is sized to what is free now, or, on an autoscaling cluster, to what it can grow
    to (pending trials are what make the autoscaler add nodes); when an autoscaler runs but does not
    say its maximum (v1), every trial is queued and the autoscaler adds what it may. A trial is
    refused only when it could never fit: more CPUs or GPUs than the cluster has or can ever have,
    or a worker larger than any node.
    """
    total, free, ceiling = capacity["total"], capacity["free"], capacity["ceiling"]
    gpw = space.gpus_per_worker
    per_trial_cpu = space.workers_per_trial * space.cpus_per_worker
    if capacity.get("autoscaler") and ceiling is None:
        # Nothing to refuse against: a trial that no node type can hold waits until Ray Train's
        # worker-group start timeout (10 minutes on a joined cluster) and then fails with the reason.
        log.warning("an autoscaler runs but does not publish its node types (autoscaler v1): queueing all %d "
                    "trials; it adds nodes up to its max_workers and the rest wait", trials)
        concurrent = trials
    else:
        def most(key):  # the most of a resource the cluster has or can have
            return max(total.get(key, 0.0), (ceiling or {}).get(key, 0.0))

        cpus, gpus = most("CPU"), most("GPU")
        if gpw and not gpus:
            log.warning("the space asks for %s GPU per worker but the cluster has none and cannot add any: "
                        "training on CPU", gpw)
            gpw = 0.0
        if per_trial_cpu > cpus:
            grow = f" and can grow to {ceiling.get('CPU', 0):g}" if ceiling else ""
            raise ConfigError(
                f"a trial needs {per_trial_cpu:g} CPUs (workers_per_trial {space.workers_per_trial} x "
                f"cpus_per_worker {space.cpus_per_worker:g}) but the Ray cluster has {total.get('CPU', 0):g}{grow}: "
                "lower resources in the space, or add nodes", source="resources")
        if space.cpus_per_worker > capacity["node_cpus"] > 0:
            raise ConfigError(f"a worker needs {space.cpus_per_worker:g} CPUs but no node has or can have more than "
                              f"{capacity['node_cpus']:g}: lower cpus_per_worker", source="resources")
        if gpw and space.workers_per_trial * gpw > gpus:
            raise ConfigError(f"a trial needs {space.workers_per_trial * gpw:g} GPUs but the cluster has {gpus:g}",
                              source="resources")
        # what this search may count on: all it can grow to when autoscaling, else what is free now
        # (another search on the same cluster holds the rest)
        room = ceiling if ceiling else free
        concurrent = int(room.get("CPU", 0.0) // per_trial_cpu)
        if gpw:
            concurrent = min(concurrent, int(room.get("GPU", 0.0) // (space.workers_per_trial * gpw)))
        if concurrent < 1:
            log.warning("the cluster has no room free for a trial now (%s CPUs free): trials will wait for it",
                        room.get("CPU", 0.0))
    return {"workers": space.workers_per_trial, "cpus_per_worker": space.cpus_per_worker,
            "in_process": space.workers_per_trial == 1 and space.trainer == "auto",
            "worker_cpu_request": space.cpus_per_worker - _WORKER_CPU_SLACK,
            "gpus_per_worker": gpw, "concurrent": max(1, min(concurrent, trials)),
            "cluster_cpus": total.get("CPU", 0.0), "cluster_gpus": total.get("GPU", 0.0),
            "free_cpus": free.get("CPU", 0.0), "autoscaler_max": ceiling,
            "autoscaler": bool(capacity.get("autoscaler"))}

