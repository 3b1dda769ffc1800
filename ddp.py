"""
Data parallel for the three stages: `torchrun --standalone --nproc_per_node=N sft.py` (or reward.py,
ppo.py) starts N copies of the script, one per device; each runs its disjoint shard [RANK::WORLD] of
every batch, and DistributedDataParallel averages the gradients
(https://pytorch.org/docs/stable/notes/ddp.html), as nanoGPT's train.py does. Without torchrun
RANK = 0, WORLD = 1 and the same code runs, every collective below a no-op.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from util import UserError


RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ddp_init(device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and return this rank's device
    (cuda:LOCAL_RANK). Ranks > 0 print nothing: their stdout goes to /dev/null (stderr stays, for tracebacks)."""
    if WORLD == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
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


def all_sum(x):
    """Tensor x summed over all ranks, in place (every rank must call it at the same point)."""
    if WORLD > 1:
        dist.all_reduce(x)
    return x


def any_rank(flag, device):
    """True on every rank if flag is true on any: Ctrl-C reaches each rank at a slightly different
    moment, but all of them must stop before the same step."""
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
    return run


def all_gather_rows(b):
    """Every rank's rows of the dict of tensors b, concatenated in rank order, on every rank. Tensors
    of the same key may differ in their second dimension between ranks (rollouts of different
    lengths): they are right-padded with 0 (masks then say "invalid") to the longest first."""
    if WORLD == 1:
        return b
    width = {k: all_max(v.size(1)) for k, v in b.items() if v.dim() > 1}
    out = {}
    for k, v in b.items():
        dtype = v.dtype
        v = v.int() if dtype == torch.bool else v  # gloo gathers no bools
        if v.dim() > 1:
            v = F.pad(v, (0, width[k] - v.size(1)))
        parts = [torch.empty_like(v) for _ in range(WORLD)]
        dist.all_gather(parts, v.contiguous())
        out[k] = torch.cat(parts).to(dtype)
    return out


def all_max(n):
    """The largest of the ints n over all ranks."""
    x = torch.tensor(n)
    if WORLD > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)
