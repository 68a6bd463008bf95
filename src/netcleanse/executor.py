"""Where independent pieces of work run: in this process (``local``) or as Ray tasks (``ray``).

A scan's label chunks, a screen's models and the zoo benchmarks' models are independent of one
another, so each goes through one small interface, :meth:`Executor.map`::

    for index, result in executor.map(fn, shared, items):
        ...   # results arrive as they finish (in order locally, in any order on Ray)

``fn(shared, item, progress)`` must be a module-level function (Ray workers import it by name);
``shared`` is what every item needs (a model, its inputs) and travels once; ``progress(amount)``
lets ``fn`` report partial progress (in the caller's units). Locally it is forwarded to the
caller's ``on_progress(index, amount)``; on Ray it does nothing (a task's progress shows when it
finishes).

:class:`LocalExecutor` is a plain loop in this process. :class:`RayExecutor` turns every item into
one Ray task: ``shared`` is put into Ray's object store once (``ray.put``) and every task gets a
reference to it, which each worker process deserialises once and keeps for the following tasks
of the same map. A task whose worker process dies is retried by Ray (``max_retries``); an
exception raised by ``fn`` is not retried and reaches the caller as itself (a
:class:`NetcleanseError` stays one line), or, with ``map(..., failures=True)``, is yielded as that
item's result (a screen makes it the model's error row and goes on). Ctrl-C (or any exception in
the caller's loop) cancels the tasks still pending. A :class:`NetcleanseWarning` a task raises
reaches the caller's warnings (one line on the command line), not the worker's log. Ray is an
optional dependency (``pip install netcleanse[ray]``); this module imports it only when a
:class:`RayExecutor` is made.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator

from .errors import NetcleanseError, NetcleanseWarning
from .utils import first_line

EXECUTORS = ("local", "ray")


class Executor:
    """Runs ``fn(shared, item, progress)`` for every item; see the module doc."""

    name = "executor"

    def map(self, fn: Callable, shared: Any, items: Iterable, on_progress: Callable | None = None,
            failures: bool = False) -> Iterator[tuple[int, Any]]:
        """(index, result) of every item; with ``failures``, an item whose work raised an
        ``Exception`` yields it (a :class:`NetcleanseError`) as its result instead of ending the map."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a result records about where it ran (not part of any resume key)."""
        return {"executor": self.name}

    def close(self) -> None:
        """Release what the executor started (a Ray instance it started itself)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExecutor(Executor):
    """Every item in this process, one after another, in order."""

    name = "local"

    def map(self, fn, shared, items, on_progress=None, failures=False):
        for i, item in enumerate(items):
            report = (lambda amount, i=i: on_progress(i, amount)) if on_progress is not None else _ignore
            if not failures:
                yield i, fn(shared, item, report)
                continue
            try:
                value = fn(shared, item, report)
            except Exception as exc:  # noqa: BLE001 - this item's failure, as its result
                value = _as_error(exc)
            yield i, value


def _as_error(exc: Exception) -> NetcleanseError:
    return exc if isinstance(exc, NetcleanseError) else NetcleanseError(f"{type(exc).__name__}: {first_line(exc)}")


def _ignore(amount) -> None:
    pass


def _import_ray():
    try:
        import ray
    except ImportError:
        raise NetcleanseError("the ray executor needs Ray, which is not installed: "
                              "pip install 'netcleanse[ray]' (or pip install ray)") from None
    return ray


class RayExecutor(Executor):
    """Every item as one Ray task (see the module doc).

    ``address``: a running cluster (``ray start --head`` prints it; "auto" finds the local one);
    None starts a private local instance with ``num_cpus`` CPUs (default: all), shut down by
    :meth:`close`. If Ray is already initialised in this process (``ray.init`` by the caller), that
    instance is used as it is. ``cpus_per_task`` / ``gpus_per_task``: the resources each task asks
    Ray for; a task sets torch to ``cpus_per_task`` threads, so results do not depend on the size
    of the worker's machine. ``max_retries``: how often a task whose worker died is rerun.
    ``pickle_by_value``: modules whose functions workers cannot import by name (scripts such as
    the benchmarks), sent by value instead.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, cpus_per_task: float = 1,
                 gpus_per_task: float = 0, max_retries: int = 3, pickle_by_value=()):
        ray = _import_ray()
        self._ray = ray
        self._owns, self._closed = False, False
        self.address = address
        self.cpus_per_task, self.gpus_per_task, self.max_retries = cpus_per_task, gpus_per_task, int(max_retries)
        for module in pickle_by_value:
            ray.cloudpickle.register_pickle_by_value(module)
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, configure_logging=True)
            if address is None:
                kwargs["num_cpus"] = num_cpus
            else:
                _check_reachable(address)
            try:
                # "local": a private instance even where a cluster runs on this machine (ray.init()
                # alone would join that one, and refuse num_cpus); a cluster only when named
                ray.init(address=address or "local", **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise NetcleanseError(f"cannot connect to {where}: {first_line(exc)}") from None
            self._owns = True
        self._remote = ray.remote(_run_task).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                                                     max_retries=self.max_retries, retry_exceptions=False)

    def describe(self) -> dict:
        resources = self._ray.cluster_resources()
        return {"executor": self.name, "ray_address": self.address, "ray_cpus": resources.get("CPU", 0),
                "ray_gpus": resources.get("GPU", 0), "cpus_per_task": self.cpus_per_task,
                "gpus_per_task": self.gpus_per_task}

    def map(self, fn, shared, items, on_progress=None, failures=False):
        ray = self._ray
        if self._closed:  # ray.put would start a new instance of its own, with other resources
            raise NetcleanseError("this Ray executor is closed; make a new one")
        from .archspec import USER_MODULE_PREFIX
        for name, module in list(sys.modules.items()):
            if name.startswith(USER_MODULE_PREFIX):  # a FILE.py architecture: workers cannot import it by name
                ray.cloudpickle.register_pickle_by_value(module)
        # a model read from .onnx is made of onnx2torch's modules, which a worker imports as it reads
        # the work; where torchvision does not import it needs the stand-in the reader used here
        prepare = ("onnx",) if "onnx2torch" in sys.modules else ()
        try:
            ref = ray.put(shared)
        except Exception as exc:  # noqa: BLE001 - whatever the serialiser raised: one line
            raise NetcleanseError(f"cannot send the work to Ray workers ({first_line(exc)})") from None
        # the reference travels inside a list so that Ray hands the task the reference, not the
        # value: the worker then deserialises it once and reuses it (see _shared_value)
        pending = {self._remote.remote(fn, [ref], item, self.cpus_per_task, prepare): i
                   for i, item in enumerate(items)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for task in done:
                    i = pending.pop(task)
                    try:
                        value, caught = self._result(task)
                    except Exception as exc:  # noqa: BLE001 - with failures, this item's result
                        if not failures:
                            raise
                        yield i, _as_error(exc)
                        continue
                    for message in caught:  # the task's warnings, as a local run shows them
                        warnings.warn(message, NetcleanseWarning, stacklevel=2)
                    yield i, value
        finally:
            for task in pending:  # Ctrl-C, or the caller stopped early: nothing left running for us
                ray.cancel(task, force=True)

    def _result(self, task):
        ray = self._ray
        try:
            return ray.get(task)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ray.exceptions.RaySystemError):
                raise self._unloadable(cause) from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except ray.exceptions.RaySystemError as exc:
            raise self._unloadable(exc) from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise NetcleanseError(f"a Ray task failed {self.max_retries + 1} times (its worker or node died): "
                                  f"{first_line(exc)}") from None

    @staticmethod
    def _unloadable(exc) -> NetcleanseError:
        # typically a model class defined in the user's script: workers import classes by name
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[0] if lines else "")
        return NetcleanseError(f"a Ray worker could not load the work it was sent ({why}); every module the "
                               "model's classes come from must be installed on the workers")

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns, self._closed = False, True


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """Refuse a cluster address where nothing answers (``ray.init`` would keep retrying for
    minutes); "auto" and addresses without a port are left to Ray."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise NetcleanseError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                              f"({first_line(exc)}); is `ray start --head` running, and is the address right?") from None


def make_executor(name: str = "local", address: str | None = None, **options) -> Executor:
    """The executor called ``name`` ("local" or "ray"); ``address`` and ``options`` go to
    :class:`RayExecutor` (an address with the local executor is an error)."""
    if name == "local":
        if address is not None:
            raise NetcleanseError("--ray-address is for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, **options)
    raise NetcleanseError(f"unknown executor {name!r}; use one of: {', '.join(EXECUTORS)}")


# ----------------------------------------------------------------------------------------------
# inside a Ray worker

_CACHE: dict[str, Any] = {}


def _shared_value(ref):
    """The value behind ``ref``, deserialised once per worker process (the latest map's only)."""
    key = ref.hex()
    if key not in _CACHE:
        import ray
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _run_task(fn, boxed_ref, item, threads, prepare=()):
    """``fn``'s result and the messages of the :class:`NetcleanseWarning` it raised (the driver
    shows them; other libraries' warnings go to the worker's log, as before)."""
    import torch
    torch.set_num_threads(max(1, int(threads)))
    if "onnx" in prepare:
        from .onnx_io import _import_onnx2torch
        _import_onnx2torch()
    os.environ.setdefault("NETCLEANSE_NO_PROGRESS", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NetcleanseWarning)
        value = fn(_shared_value(boxed_ref[0]), item, _ignore)
    for w in caught:
        if not issubclass(w.category, NetcleanseWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return value, [str(w.message) for w in caught if issubclass(w.category, NetcleanseWarning)]
