"""The processes of one run: alone, or one per GPU under torchrun.

`start(device)` returns the run's group of processes:

- `Solo` without torchrun (no WORLD_SIZE in the environment): one process does all
  the work on `device`, exactly as a run without this module.
- `Ranks` under torchrun: the process joins torchrun's process group (NCCL for
  `--device cuda`, each process on cuda:LOCAL_RANK; gloo for the CPU).

Both offer the same few operations, so the calling code is the same for one process
and for many:

- `share(name, make)`: rank 0 computes a small value (e.g. the list of unfinished
  layers, after checking and preparing the output folder) and every rank gets it; a
  UserInputError there is raised on every rank.
- `claims(name, count)`: a work queue over the items 0..count-1. Each rank takes the
  next unclaimed item when it is free (an atomic counter in torchrun's TCPStore), so
  every item goes to exactly one rank and fast ranks take more.
- `barrier(name)`: waits until every rank got there (polls the store; no timeout, so
  a rank may wait for another's long work).
- `sum_to_main(tensor)`: rank 0 gets the sum over the ranks, added in rank order
  (t0 + t1 + ...: the result does not depend on timing or on the backend's reduction
  algorithm); the other ranks get None.

Crashes: the coordination keys live in the store under a prefix drawn by rank 0 at
start. torchrun's store ends with the launch, and an elastic restart draws a new
prefix, so the claims of a crashed launch never block the next one; the output folder
only ever holds finished files (written atomically), from which a rerun recomputes
what is left to do. (Exclusive-create claim files in the output folder would need a
guess, after a crash, whether their owner is still alive, and rely on O_EXCL being
atomic on the file system, e.g. NFS; the store's counter needs neither.)
"""
import os
import pickle
import secrets
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lib.utils.errors import UserInputError

# Longest wait inside one collective (a Hessian reduction waits for the other ranks'
# forward of one layer); barriers and shares poll the store and do not time out.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
POLL_SECONDS = (0.01, 1.0)   # store polls start this often and back off to this
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun():
    return "WORLD_SIZE" in os.environ


class Solo:
    """One process doing all the work."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device):
        self.device = device

    def share(self, name, make):
        return make()

    def claims(self, name, count):
        return iter(range(count))

    def barrier(self, name):
        pass

    def sum_to_main(self, tensor):
        return tensor

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Ranks:
    """One of `world_size` processes; `store` holds this launch's coordination keys,
    `comm_device` is where tensors travel (cuda:LOCAL_RANK with NCCL, cpu with gloo)."""

    def __init__(self, store, rank, world_size, device, comm_device):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device, self.comm_device = device, comm_device

    @property
    def is_main(self):
        return self.rank == 0

    def _wait_until(self, done):
        pause = POLL_SECONDS[0]
        while not done():
            time.sleep(pause)
            pause = min(POLL_SECONDS[1], pause * 1.5)

    def share(self, name, make):
        key = f"share/{name}"
        if self.is_main:
            try:
                value = make()
            except UserInputError as err:
                self.store.set(key, pickle.dumps(("user_error", str(err))))
                raise
            except Exception as err:
                self.store.set(key, pickle.dumps(("failure", f"{type(err).__name__}: {err}")))
                raise
            self.store.set(key, pickle.dumps(("value", value)))
            return value
        self._wait_until(lambda: self.store.check([key]))
        kind, value = pickle.loads(self.store.get(key))
        if kind == "user_error":
            raise UserInputError(value)
        if kind == "failure":
            raise RuntimeError(f"rank 0 failed while preparing the run ({name}): {value}")
        return value

    def claims(self, name, count):
        key = f"claims/{name}"
        while True:
            item = self.store.add(key, 1) - 1
            if item >= count:
                return
            yield item

    def barrier(self, name):
        key = f"barrier/{name}"
        self.store.add(key, 1)
        self._wait_until(lambda: self.store.add(key, 0) >= self.world_size)

    def sum_to_main(self, tensor):
        local = tensor.to(self.comm_device)
        if not self.is_main:
            dist.send(local.contiguous(), dst=0)
            return None
        total = local.clone()
        incoming = torch.empty_like(total)
        for source in range(1, self.world_size):
            dist.recv(incoming, src=source)
            total += incoming
        return total.to(tensor.device)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:   # after an error the process exits; torchrun stops the others
            dist.destroy_process_group()
        return False


def _launch_environment():
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise UserInputError(
            f"WORLD_SIZE is set but {', '.join(missing)} not: launch several processes with "
            f"`torchrun --standalone --nproc_per_node N -m ...`, or unset WORLD_SIZE for one process")
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise UserInputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                             f"{os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}, "
                             f"{os.environ['LOCAL_RANK']!r}") from None


def _rank_device(device, local_rank, world_size):
    """(compute device, backend) of this rank: cuda:LOCAL_RANK with NCCL, or gloo on the CPU."""
    if not device.startswith("cuda"):
        return device, "gloo"
    if device != "cuda":
        raise UserInputError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                             f"(or leave --device out), not --device {device}")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise UserInputError(f"torchrun started process LOCAL_RANK {local_rank} ({world_size} in all) but "
                             f"only {visible} GPU(s) are visible: use --nproc_per_node <= {visible}")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}", "nccl"


def start(device):
    """The run's processes: `Solo(device)` without torchrun, else this rank's `Ranks`
    (use as a context manager: the process group is closed at a normal exit)."""
    if not launched_by_torchrun():
        return Solo(device)
    rank, world_size, local_rank = _launch_environment()
    device, backend = _rank_device(device, local_rank, world_size)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    dist.init_process_group(backend, store=dist.PrefixStore("process_group", store), rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    comm_device = device if backend == "nccl" else "cpu"
    launch = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64, device=comm_device)
    dist.broadcast(launch, src=0)
    prefix = f"harp/{int(launch.item())}/"
    return Ranks(dist.PrefixStore(prefix, store), rank, world_size, device, comm_device)


def batch_shard(num_items, batch_size, rank, world_size):
    """This rank's contiguous slice of `num_items` items, made of whole batches of
    `batch_size` (the batches of a one-process run, in the same order): the batches
    are divided as evenly as possible, lower ranks first."""
    batches = -(-num_items // batch_size)
    first, stop = rank * batches // world_size, (rank + 1) * batches // world_size
    return slice(min(first * batch_size, num_items), min(stop * batch_size, num_items))
