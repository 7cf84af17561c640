"""Process-group details shared by the training and labelling jobs."""

import os
from datetime import timedelta

import torch


_OTHER_ACCELERATORS = ("xpu", "npu", "mlu", "musa", "sdaa", "hpu", "neuron")
"""Devices besides CUDA that accelerate runs processes on, by the name of its ``is_<name>_available`` check."""


def has_accelerator_device() -> bool:
    """True when a CUDA GPU or another device accelerate supports (Intel XPU, Ascend NPU, ...) is available."""
    if torch.cuda.is_available():
        return True
    import accelerate.utils

    return any(getattr(accelerate.utils, f"is_{name}_available", lambda: False)() for name in _OTHER_ACCELERATORS)


def use_cpu_process_group() -> bool:
    """True when several processes were launched (``accelerate launch --multi_gpu``/``torchrun``) on a machine
    without GPUs or other accelerator devices. accelerate only joins such processes into one (gloo) group when
    told to use the CPU; otherwise every process would silently run the whole job alone. On a machine with
    accelerator devices accelerate uses them (telling it to use the CPU there would train on the CPU)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator_device()


def process_state(timeout_seconds: int):
    """The process-wide ``accelerate`` ``PartialState``, joining the launched processes (gloo on machines without
    accelerator devices, see :func:`use_cpu_process_group`) with a collective timeout of ``timeout_seconds``
    (``--ddp_timeout``): how long processes wait at a collective, e.g. for the main process that downloads,
    writes a checkpoint or assembles a dataset alone, before the job stops (torch's own default for NCCL is 10
    minutes). Create it before anything else touches the state: the first creation sets up the group and later
    arguments are ignored."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu_process_group(), timeout=timedelta(seconds=timeout_seconds))


def leave_process_group(wait: bool = True) -> None:
    """Wait for the other processes (``wait``), then leave the default process group (no-op without one). Call
    at the end of a job: a process that exits still inside a gloo group can abort at interpreter exit ("terminate
    called without an active exception", status -6) and turn a finished run, or an error's status, into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


class OtherProcessFailed(RuntimeError):
    """Raised on the processes that did not fail when another one did, so that every process stops (none is left
    waiting for the failed one at the next collective)."""


def computed_on_main(compute, state, what: str = "compute a shared value"):
    """``compute()`` evaluated by the main process alone and sent to the others (pickled, one broadcast), so that
    every process holds the same value even where the others would see something else (per-node file copies,
    other mount points); also a main-only step the others wait for. An exception on the main process is raised
    there and, as :class:`OtherProcessFailed` naming it (``"the main process failed to <what>: ..."``), on the
    others. ``state``: an ``accelerate`` ``PartialState``/``Accelerator`` (``None``: a single process)."""
    if state is None or state.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    payload = [None]
    if state.is_main_process:
        try:
            payload = [(True, compute())]
        except Exception as error:  # sent too, so that every process stops instead of waiting in the broadcast
            payload = [(False, f"{type(error).__name__}: {error}")]
            failure = error
    broadcast_object_list(payload, from_process=0)
    ok, value = payload[0]
    if not ok:
        if state.is_main_process:
            raise failure
        raise OtherProcessFailed(f"the main process failed to {what}: {value}")
    return value


def on_every_process(work, state, what: str):
    """``work()`` on every process, then a collective (a gather of each process's exception, which also serves as
    a barrier): if any process failed, every process raises, the failed ones their own exception and the others
    :class:`OtherProcessFailed` naming each failure. Returns this process's ``work()``. ``state`` as in
    :func:`computed_on_main`."""
    value, failure = None, None
    try:
        value = work()
    except Exception as error:
        failure = error
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        failures = gather_object([None if failure is None else f"{type(failure).__name__}: {failure}"])
        if failure is None and any(failures):
            named = "; ".join(f"process {rank}: {text}" for rank, text in enumerate(failures) if text)
            raise OtherProcessFailed(f"another process failed to {what} ({named})")
    if failure is not None:
        raise failure
    return value


def main_process_first(load, state, what: str):
    """``load()`` on the main process, then on the others (so that they find what it downloaded or cached), like
    ``accelerate``'s ``main_process_first`` but a failure on any process stops every process (the others would
    otherwise wait at the barrier the failed one never reaches). ``state`` as in :func:`computed_on_main`."""
    if state is None or state.num_processes == 1:
        return load()
    main_value = on_every_process(load if state.is_main_process else lambda: None, state, what)
    other_value = on_every_process(lambda: None if state.is_main_process else load(), state, what)
    return main_value if state.is_main_process else other_value


def same_on_every_process(value: str, state, what: str) -> None:
    """Raise ``ValueError`` on every process (never on some only: the others would wait forever) when the
    processes hold different ``value``; ``what`` names it in the message."""
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    values = gather_object([value])
    if len(set(values)) > 1:
        raise ValueError(f"the processes disagree on {what}: {values} (rank order). Every process must read the "
                         "same model weights, dataset and options.")
