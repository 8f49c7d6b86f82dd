"""Cells as Ray tasks (``peftlab sweep --executor ray``; ``pip install peftlab[ray]``).

Each cell is one task asking for the CPUs and GPUs a cell needs; the task runs the same worker
command as the local executor (``python -m peftlab.sweep.worker INPUTS RECORD``), so the worker
writes the record into the results folder itself: on a multi-machine cluster that folder must be
on a filesystem every node sees. ``--ray-address`` joins a running cluster; without it a local
instance is started for the sweep and stopped after. A task whose worker dies, or whose Ray worker
or node is lost, becomes a ``failed`` row, and the next sweep runs it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftlab.plugin.errors import ValidationError
from peftlab.sweep.executors.base import (
    ClusterExecutor,
    exit_reason,
    worker_command,
    written_or_failed,
)
from peftlab.sweep.experiment import PlannedCell
from peftlab.sweep.store import CellFiles


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValidationError("executor", "ray", "an installed Ray: pip install 'peftlab[ray]'") from None
    return ray


def answers(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a cluster address whose host:port does not accept a connection within ``timeout_s``
    (``ray.init`` itself keeps retrying for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValidationError("ray_address", address, "host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValidationError("ray_address", address, f"a Ray cluster that answers (no connection within "
                              f"{timeout_s:.0f} s: {exc.strerror or exc})") from None


class RayExecutor(ClusterExecutor):
    """One Ray task per cell, ``cpus`` and ``gpus`` each (the worker uses ``cpus`` torch threads)."""

    def __init__(self, address: str | None = None, cpus: int = 1, gpus: int = 0, init_args: dict[str, Any] | None = None):
        self.ray = import_ray()
        super().__init__(cpus, gpus)
        self.address = address
        self.init_args = init_args or {}

    def _connect(self) -> bool:
        """Join the cluster (or start a local instance); True when this sweep started Ray."""
        ray = self.ray
        if ray.is_initialized():
            return False
        if self.address and self.address != "auto":
            answers(self.address)
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_args)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            where = self.address or "a local instance"
            raise ValidationError("ray_address", where, f"a Ray cluster that answers ({type(exc).__name__}: {exc})") from None
        return True

    def run_all(self, cells: list[PlannedCell], files: Callable[[PlannedCell], CellFiles],
                on_record: Callable[[PlannedCell, CellFiles, dict[str, Any]], None]) -> None:
        if not cells:
            return
        ray = self.ray
        started = self._connect()
        try:
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(self.task())
            env = self.worker_env()
            pending = {}
            for cell in cells:
                f = files(cell)
                pending[remote.remote(worker_command(f), env)] = (cell, f)
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        cell, f = pending.pop(ref)
                        try:
                            rc, tail = ray.get(ref)
                            reason = exit_reason(rc, tail)
                        except ray.exceptions.RayError as exc:  # the task, its worker or its node was lost
                            reason = f"the Ray task was lost ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})"
                        on_record(cell, f, written_or_failed(cell, f, reason))
            except BaseException:  # Ctrl-C: cancel what is still running; its cells get no record
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()
