"""Where this process trains: device, and its place in a DDP job.

Azure ML's `distribution: pytorch` and `torchrun` both set WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. With WORLD_SIZE > 1 we join the process group (NCCL on GPU,
gloo on CPU); otherwise nothing distributed happens at all.

A failure on one rank must not leave the others blocked in a collective until the timeout
(NCCL does not notice a dead peer, and not every launcher kills the survivors as torchrun does). So each
rank watches a key in the rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that every
rank already reaches): a failing rank writes its one-line error there, and every other rank
prints it and exits at once, with the root cause as its own last stderr line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import InvalidParameterError, TrainingFailedError, TrainPyTorchModelError

log = logging.getLogger(__name__)

# Per attempt: torchrun --max-restarts keeps its store across restarts, and an old failure must not end the new attempt.
FAILURE_KEY = f"train_pytorch_model/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
POLL_SECONDS = 0.5


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    watch: FailureWatch | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks (in place)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (an (n, k) tensor, int64 or float; n may differ, even be 0), concatenated in rank order, on
        every rank. Padded to the longest, as all_gather needs equal shapes."""
        if not self.distributed:
            return rows
        count = torch.tensor([len(rows)], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        counts = [int(c.item()) for c in counts]
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))
        padded[:len(rows)] = rows
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def any_rank(self, *flags: bool) -> list[bool]:
        """For each flag: is it true on at least one rank? (Every rank gets the same answer.)"""
        if not self.distributed:
            return [bool(f) for f in flags]
        tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (so every rank stops at the same epoch)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP syncs buffers at the start of each forward, so after an epoch every rank holds its own
        last update; rank 0's are the ones that get saved, so those are the ones to validate."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def broadcast_object(self, obj):
        """Rank 0's (picklable) object on every rank."""
        if not self.distributed:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, device=self.device if self.device.type == "cuda" else None)
        return holder[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class FailureWatch:
    """Polls the rendezvous store for another rank's failure; `report` publishes this rank's."""

    def __init__(self, rank: int, host: str, port: int, timeout: timedelta):
        self.rank = rank
        # A client of its own: the thread never shares a connection with the process group.
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="failure-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                cause = self.store.get(FAILURE_KEY).decode("utf-8", "replace")
            except Exception:  # the store went away (rank 0 or the launcher exited): nothing to read
                return
            if self.stopped.is_set():
                return
            error = TrainingFailedError(f"Another process of this distributed job failed, so process {self.rank} "
                                        f"stops too. The failure: {cause}")
            print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            # The main thread is blocked inside a collective that will never complete: leave now.
            os._exit(error.exit_code)

    def stop(self) -> None:
        self.stopped.set()

    def report(self, error: BaseException) -> None:
        self.stop()
        message = " ".join(str(error).split())[:2000]
        try:
            self.store.set(FAILURE_KEY, f"process {self.rank}: {type(error).__name__}: {message}")
        except Exception:  # best effort; the launcher or the timeout still ends the job
            return
        # Stay alive (and connected) a moment, so the others read the cause before they see a closed socket.
        time.sleep(5 * POLL_SECONDS)


def pick_device(requested: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process. In a job of several processes each takes GPU LOCAL_RANK: a GPU index
    given by name would put every process on that one GPU (NCCL then fails with a duplicate-GPU error)."""
    if world_size > 1 and requested.startswith("cuda:"):
        raise InvalidParameterError("Device", requested, f"this job runs {world_size} processes and each uses its own "
                                    "GPU (LOCAL_RANK): use cuda or auto, and choose the GPUs with "
                                    "CUDA_VISIBLE_DEVICES")
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("Device", requested, "no CUDA GPU is available here; use auto or cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto", timeout_minutes: float = 30) -> Context:
    """Join the job's process group when WORLD_SIZE > 1. `timeout_minutes` bounds the rendezvous and
    every collective: the longest a rank may wait for the others (rank 0 writing the model included)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return Context(pick_device(requested_device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, torch.cuda.device_count())
    device = pick_device(requested_device, local_rank, world_size)
    if rank != 0:
        # One voice: rank 0 prints progress; the others only warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, init_method="env://", timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    watch = None
    try:
        watch = FailureWatch(rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout)
    except Exception as exc:  # without it a failure still ends the job, only later
        log.warning("Cannot watch the other processes for failures (%s); a failed process may leave the others "
                    "waiting until the %g-minute timeout.", exc, timeout_minutes)
    return Context(device, rank, world_size, local_rank, local_world_size, watch)


def teardown(context: Context, failure: BaseException | None = None) -> None:
    """Leave the process group. With `failure` (an exception leaving this rank, not one every rank
    raises together), tell the other ranks first and skip the collective shutdown."""
    if context.watch is not None:
        context.watch.stop()
    if not context.distributed or not dist.is_initialized():
        return
    if failure is not None and not (isinstance(failure, TrainPyTorchModelError) and failure.raised_on_every_rank):
        if context.watch is not None:
            context.watch.report(failure)
        return  # destroy_process_group could wait on peers that are stuck in a collective
    dist.destroy_process_group()
