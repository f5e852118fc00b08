"""Where the per-photo and per-pair work runs: in this process (`local`) or as Ray tasks (`ray`).

The engine's parallel loops (embedding photos, extracting keypoints and verifying pairs) hand
chunks of work to `Executor.map`, which yields each chunk's result in the order of the chunks.
The function is the same module-level function either way; under Ray it runs as a task
(`ray.remote`, retried up to `max_retries` times when its worker dies) and its result comes back
to the driver. Caches are written by the driver only: workers need no shared storage, one process
writes each cache (no two writers on a shard), and a worker killed mid-task has written nothing,
so nothing half-written can land in a cache. Large arguments shared by every chunk (the network's
weights) are put in Ray's object store once.

`--ray-address` (default: $RAY_ADDRESS, else a local Ray started on demand with this machine's CPUs)
connects to an existing cluster, e.g. `ray://head:10001` or `auto` on a node of it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.errors import UserError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
REPO = Path(__file__).resolve().parents[1]
# test hook: a Ray task kills its own worker process once (the first task to find this file absent
# creates it, then dies): proves a dead worker costs a retry, not the run
KILL_ONCE_ENV = "PHOTOID_KILL_WORKER_ONCE"


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"  # local|ray
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    num_cpus: int | None = None  # a local Ray's CPUs (default: all)
    max_retries: int = 3  # per task, when its worker dies


class LocalExecutor:
    name = "local"
    remote = False

    def map(self, fn: Callable, chunks: Iterable, *shared: Any, cpus: int = 1) -> Iterator:
        for chunk in chunks:
            yield fn(chunk, *shared)

    def put(self, value):
        return value


class RayExecutor:
    """Chunks as Ray tasks, at most `window` in flight, results in chunk order."""
    name = "ray"
    remote = True

    def __init__(self, cfg: ExecutorConfig):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs the ray package (pip install ray)") from None
        self.ray, self.cfg = ray, cfg
        if not ray.is_initialized():
            address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
            # the engine's code goes with the tasks: on a local Ray by its path, to a cluster as Ray's
            # working_dir (uploaded once per job); plus the test hook, when set
            env = {k: v for k, v in os.environ.items() if k == KILL_ONCE_ENV}
            runtime_env: dict = {"env_vars": env}
            if address:
                runtime_env["working_dir"] = str(REPO)
                runtime_env["excludes"] = [".venv", ".git", "runs", "bench/results", "**/__pycache__"]
            else:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            try:
                ray.init(address=address, num_cpus=None if address else cfg.num_cpus, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
            except Exception as e:  # ConnectionError and Ray's own: the user's address is wrong
                raise UserError(f"cannot start or reach Ray at {address or 'a local instance'}: {e}") from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.window = 2 * self.cpus
        self._remote: dict[Callable, Any] = {}

    def put(self, value):
        return self.ray.put(value)

    def map(self, fn: Callable, chunks: Iterable, *shared: Any, cpus: int = 1) -> Iterator:
        """`cpus`: CPUs each task takes (and uses: a task that runs torch sets that many threads)."""
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(max_retries=self.cfg.max_retries)(fn)
        remote = remote.options(num_cpus=min(cpus, self.cpus))
        shared = [s if isinstance(s, self.ray.ObjectRef) else self.ray.put(s) for s in shared]
        pending: list = []
        it = iter(chunks)
        for chunk in it:
            pending.append(remote.remote(chunk, *shared))
            if len(pending) >= self.window:
                break
        while pending:
            result = self.ray.get(pending.pop(0))
            nxt = next(it, None)
            if nxt is not None:
                pending.append(remote.remote(nxt, *shared))
            yield result


_EXECUTOR: dict = {}
_CURRENT: list = []  # the executor chosen for this process (the CLI's --executor), if any


def make_executor(cfg: ExecutorConfig | None = None):
    """The executor of this process (one Ray connection, reused)."""
    cfg = cfg or ExecutorConfig()
    if cfg.kind not in EXECUTORS:
        raise UserError(f"--executor {cfg.kind!r}: choose one of {', '.join(EXECUTORS)}")
    if cfg.kind == "local":
        return LocalExecutor()
    if cfg not in _EXECUTOR:
        _EXECUTOR[cfg] = RayExecutor(cfg)
    return _EXECUTOR[cfg]


def kill_once_hook() -> None:
    """Inside a task: die once if the test hook asks for it (see KILL_ONCE_ENV)."""
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), 9)


def use_executor(cfg: ExecutorConfig) -> None:
    """Choose the executor of this process's parallel loops (the CLI's --executor); Ray connects
    here, so a wrong address fails before any work."""
    _CURRENT[:] = [make_executor(cfg)]


def current_executor():
    """The executor chosen by use_executor, else the local one."""
    return _CURRENT[0] if _CURRENT else LocalExecutor()
