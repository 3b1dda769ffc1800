"""
Data parallel for the three stages: `torchrun --standalone --nproc_per_node=N sft.py` (or reward.py,
ppo.py) starts N copies of the script, one per device; each runs its disjoint shard [RANK::WORLD] of
every batch, and DistributedDataParallel averages the gradients
(https://pytorch.org/docs/stable/notes/ddp.html), as nanoGPT's train.py does. Without torchrun
RANK = 0, WORLD = 1 and the same code runs, every collective below a no-op.
"""
import contextlib
import functools
import os
import sys
import zlib

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from util import UserError


RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
DEVICE = torch.device("cpu")  # this rank's device (ddp_init): every tensor handed to a collective must be on it
CHECK_DEVICES = os.environ.get("MINRLHF_CHECK_DEVICES", "") == "1"  # set by test_ddp.py: see collective()


def ddp_init(device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and return this rank's device
    (cuda:LOCAL_RANK). Ranks > 0 print nothing: their stdout goes to /dev/null (stderr stays, for tracebacks)."""
    global DEVICE
    if WORLD == 1:
        return device
    if device.startswith("cuda"):
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", WORLD)), torch.cuda.device_count()
        if per_node > gpus:  # every rank checks alike, so rank 0 says it (ddp_main) and none hangs waiting
            raise UserError(f"torchrun started {per_node} processes on this machine, which has {gpus} GPU(s): "
                            f"--nproc_per_node={gpus} (or --device=cpu)")
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    DEVICE = torch.device(device)
    # nccl where there is one (not on Windows or macOS); gloo, which reduces CUDA tensors too, elsewhere
    dist.init_process_group("nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo")
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def ddp_wrap(model, device):
    """The model that training calls forward/backward on: under DDP its backward all-reduces gradients."""
    return DDP(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None) if WORLD > 1 else model


def no_sync(model, skip):
    """Skip DDP's gradient all-reduce on all but the last micro-step of gradient accumulation: the
    earlier micro-steps' gradients accumulate locally and go out in the last one's all-reduce."""
    return model.no_sync() if skip and WORLD > 1 else contextlib.nullcontext()


def collective(f):
    """f hands tensors to torch.distributed. nccl takes tensors on the rank's GPU only, but gloo on the
    CPU takes any, so a tensor built without device= passes every CPU test and stops the first run on 2+
    GPUs (issue 19: all_max's torch.tensor(n)). With MINRLHF_CHECK_DEVICES=1 (the DDP tests) f runs with
    torch's default device set to "meta", so such a tensor is a meta tensor, which on_device refuses."""
    @functools.wraps(f)
    def run(*args, **kwargs):
        with torch.device("meta") if CHECK_DEVICES else contextlib.nullcontext():
            return f(*args, **kwargs)
    return run


def on_device(x):
    """x, after checking that it is on this rank's device, as every tensor handed to a collective must be."""
    if x.device != DEVICE:
        raise RuntimeError(f"ddp: a {tuple(x.shape)} tensor on {x.device} handed to a collective of the rank on {DEVICE}")
    return x


@collective
def all_sum(x):
    """Tensor x summed over all ranks, in place (every rank must call it at the same point)."""
    if WORLD > 1:
        dist.all_reduce(on_device(x))
    return x


@collective
def any_rank(flag, device):
    """True on every rank if flag is true on any: Ctrl-C reaches each rank at a slightly different
    moment, but all of them must stop before the same step. One process: no tensor, so no wait for the
    GPU at every step (a tensor made from a Python number, then read back, waits for all queued work)."""
    if WORLD == 1:
        return bool(flag)
    return bool(all_sum(torch.tensor(float(flag), device=device)))


def save_and_exit(save, message):
    """After Ctrl-C on any rank (any_rank): rank 0 saves while the others wait (once one rank has exited,
    torchrun kills the rest), then every rank exits with 130 and rank 0 says how to resume."""
    if RANK == 0:
        save()
    barrier()
    if RANK == 0:
        print(message, file=sys.stderr, flush=True)
    sys.exit(130)


def barrier():
    if WORLD > 1:
        dist.barrier()


def rank0_first(f, *args):
    """f(*args) on rank 0, then on the other ranks: rank 0 downloads what is missing (hh-rlhf), the others
    read its cached copy rather than all fetching it at once."""
    if RANK > 0:
        barrier()
    out = f(*args)
    if RANK == 0:
        barrier()
    return out


def ddp_main(main):
    """main for main_guard. Every rank reads the same settings, data and checkpoints and checks them
    alike, and the gradient-norm check sees the all-reduced gradient, so a UserError (or the second
    Ctrl-C) happens on every rank: rank 0 prints it once (main_guard) and the others exit with the
    same code silently. A crash on one rank alone keeps its traceback, and torchrun stops the rest."""
    def run(argv):
        try:
            main(argv)
        except (UserError, KeyboardInterrupt) as e:
            if RANK == 0:
                raise
            sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
        if WORLD > 1:
            dist.barrier()  # a rank leaving while another still works (rank 0 saving) aborts gloo
            dist.destroy_process_group()
            # Everything is written (atomically): skip the interpreter's finalization, where gloo's worker
            # threads can still hold tensors and abort the process ("terminate called without an active
            # exception", SIGABRT; seen about once in 25 two-rank runs here; pytorch/pytorch#179291).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return run


@collective
def all_gather_rows(b):
    """Every rank's rows of the dict of tensors b (all on this rank's device), concatenated in rank
    order, on every rank. The contract, checked (a ValueError naming the key and shapes, raised alike
    on every rank for what differs between ranks): each value is a 1-D (B,) or 2-D (B, T) tensor with
    the same B as the others; every rank passes the same keys in the same order, each with the same
    dtype and number of dimensions, and the same B. T may differ between ranks (rollouts of different
    lengths): the 2-D tensors are right-padded with 0 (masks then say "invalid") to the longest first."""
    if not b:
        raise ValueError("all_gather_rows: an empty dict (no rows to gather)")
    k0, v0 = next(iter(b.items()))
    for k, v in b.items():  # checked with one process too, so a mistake shows before a run under torchrun
        if not torch.is_tensor(v) or v.dim() not in (1, 2):
            what = tuple(v.shape) if torch.is_tensor(v) else f"a {type(v).__name__}"
            raise ValueError(f"all_gather_rows: b[{k!r}] is {what}: each value must be a (B,) or (B, T) tensor "
                             f"(only dim 1 is padded between ranks)")
        if v.size(0) != v0.size(0):
            raise ValueError(f"all_gather_rows: b[{k!r}] is {tuple(v.shape)} but b[{k0!r}] {tuple(v0.shape)}: every "
                             f"value must hold as many rows")
    if WORLD == 1:
        return b
    # What the ranks must agree on, compared in one all_max of 4 ints (the ranks agree where max(x) = -max(-x)),
    # so that every rank raises alike. Unchecked, a mismatch hangs (a key more on one rank),
    # aborts the process (gloo: "Received data size doesn't match expected size") or gathers garbage
    # (float32 against int32). A reduce of its own: the widths' all_max below has one int per (B, T) key.
    layout = [(k, str(v.dtype), v.dim()) for k, v in b.items()]
    sig = zlib.crc32(repr(layout).encode())  # the same on every rank for the same layout (unlike hash())
    hi_rows, lo_rows, hi_sig, lo_sig = all_max([v0.size(0), -v0.size(0), sig, -sig], v0.device)
    if hi_sig != -lo_sig:
        raise ValueError(f"all_gather_rows: the ranks' dicts differ in their keys, order, dtypes or dims; rank {RANK} "
                         f"holds {layout} (the other ranks' tracebacks show theirs)")
    if hi_rows != -lo_rows:
        raise ValueError(f"all_gather_rows: the ranks hold {-lo_rows} to {hi_rows} rows (rank {RANK}: b[{k0!r}] is "
                         f"{tuple(v0.shape)}); each must hold as many")
    keys = [k for k, v in b.items() if v.dim() == 2]
    width = dict(zip(keys, all_max([b[k].size(1) for k in keys], v0.device)))
    out = {}
    for k, v in b.items():
        dtype = v.dtype
        v = v.int() if dtype == torch.bool else v  # gloo gathers no bools
        if v.dim() == 2:
            v = F.pad(v, (0, width[k] - v.size(1)))
        parts = [torch.empty_like(v) for _ in range(WORLD)]
        dist.all_gather(parts, on_device(v.contiguous()))
        out[k] = torch.cat(parts).to(dtype)
    return out


@collective
def all_max(ns, device):
    """The elementwise largest of the lists of ints ns over all ranks, built on this rank's device:
    an nccl group reduces CUDA tensors only."""
    x = torch.tensor(ns, device=device)
    if WORLD > 1:
        dist.all_reduce(on_device(x), op=dist.ReduceOp.MAX)
    return x.tolist()
