"""Connecting to Ray: a running cluster by address, or a local one started for the job."""

from __future__ import annotations

import os
import socket

from modelrecon.errors import BadInputError

LOCAL = "local"  # `--ray` with no address


def connect(address: str | None = LOCAL, num_cpus: int | None = None):
    """The `ray` module, initialised: `address` is 'local' (RAY_ADDRESS when set, else a new local cluster),
    'auto' (the cluster `ray start` began on this machine), or 'HOST:PORT' / 'ray://HOST:PORT'.

    An already initialised Ray (a notebook's, a test's) is used as it is.
    """
    try:
        import ray
    except ImportError:
        raise BadInputError("--ray needs Ray: pip install 'modelrecon[scale]'") from None
    if address in (None, LOCAL):
        address = os.environ.get("RAY_ADDRESS")
    if address not in (None, "auto"):
        _check_reachable(address)  # Ray itself retries an unreachable address for minutes
    if ray.is_initialized():
        return ray
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address is None:
        options["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BadInputError(
            f"cannot connect to the Ray cluster at {address!r} ({str(exc).splitlines()[0][:160]}); "
            "start one with `ray start --head` or give its address"
        ) from None
    return ray


def worker_cpus(ray, workers: int | None) -> tuple[int, float]:
    """(number of workers, CPUs each): by default one worker per two CPUs of the cluster, at least one."""
    total = float(ray.cluster_resources().get("CPU", 1))
    if workers is None:
        workers = max(1, int(total // 2))
    if workers < 1:
        raise BadInputError("--workers must be at least 1")
    return workers, max(1.0, min(total / workers, total))


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise BadInputError(
            f"no Ray cluster answers at {address!r}; start one with `ray start --head` (it prints the address), "
            "or use --ray local"
        ) from None
