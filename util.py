"""
What every script shares and none is about: one-line errors and exit codes, `--key=value` config
overrides, a Ctrl-C that saves first, atomic file writes and downloads, and the device, precision,
optimizer and learning-rate schedule that sft.py, reward.py and ppo.py train with. Imports nothing
of this repo, so every file can import it.
"""
import contextlib
import ctypes
import dataclasses
import hashlib
import http.client
import inspect
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request

import torch

# -----------------------------------------------------------------------------
# errors, config, files

class UserError(Exception):
    """Bad input or settings. Printed as one line `error: ...`, exit code 2, no traceback."""


def main_guard(main, argv=None, usage=None):
    """Run main(argv). A UserError (or Ctrl-C) becomes one line and a non-zero exit; the traceback
    is kept with --debug on the command line or MINRLHF_DEBUG=1 in the environment. With `usage` (a
    script's docstring), --help or -h prints it and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    if usage and ("--help" in argv or "-h" in argv):
        print(usage.strip())
        return
    debug = "--debug" in argv or os.environ.get("MINRLHF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    keep_freed_memory()
    try:
        return main(argv)
    except (UserError, KeyboardInterrupt) as e:
        if debug:
            raise
        print(f"error: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
    except BrokenPipeError:  # `python ppo.py --help | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's docs, "Note on SIGPIPE"
        sys.exit(1)


def keep_freed_memory():
    """Have glibc keep freed memory for reuse instead of handing every large block back to the OS:
    otherwise each step's big tensors (a (V, C) embedding gradient is 154 MB) are mapped afresh and
    page-faulted in. A PPO update of GPT-2 small on 2 CPU cores: 8.8 -> 6.5 s (bench.py). What
    LD_PRELOAD=libjemalloc.so does for PyTorch on CPU, with nothing to install."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc
            return
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the reusable heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never shrink the heap


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM during training sets .requested instead of interrupting a step
    half-done; the loop checks it between steps, saves a checkpoint and exits with 130
    (ddp.save_and_exit). A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)


def _field_comments(cls):
    """The `# comment` after each field in the dataclass source: the meaning --help prints."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M))


def _parse_value(text, typ, key):
    if typ is bool or typ == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={text}: expected True or False")
    typ = {"int": int, "float": float, "str": str}.get(typ, typ)
    if typ is str and text.startswith("~"):  # the shell leaves --key=~/path alone: no ~ folder in the cwd
        return os.path.expanduser(text)
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {typ.__name__}") from None


def parse_config(cls, argv):
    """Build a `cls` dataclass from `--key=value` arguments (`--flag` alone means True).
    An unknown key or a value of the wrong type is a UserError listing the valid keys;
    `--help` prints every field with its default and the comment beside it, then exits 0."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        comments = _field_comments(cls)
        print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\n\nsettings:")
        left = {name: f"--{name}={f.default!s}" for name, f in fields.items()}
        width = max(map(len, left.values()))
        for name in fields:
            print(f"  {left[name]:<{width}}  {comments.get(name, '')}")
        sys.exit(0)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings are --key=value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown setting --{key}; valid: {', '.join('--' + k for k in fields)}")
        if not eq:
            if fields[key].type not in (bool, "bool"):
                raise UserError(f"--{key} needs a value: --{key}=VALUE (settings are --key=value, no space)")
            text = "True"
        overrides[key] = _parse_value(text, fields[key].type, key)
        v = overrides[key]  # nan slips past every `x <= 0` check: allowed only where cls.NONFINITE names the setting
        if isinstance(v, float) and not math.isfinite(v) and key not in getattr(cls, "NONFINITE", ()):
            raise UserError(f"--{key}={text}: expected a finite number")
    return cls(**overrides)


def check_common(cfg):
    """The settings the three stages share, where a stage has them: one-line errors (a nan fails
    every `not x >= 0`)."""
    for key in ("warmup_iters", "weight_decay", "grad_clip"):
        if hasattr(cfg, key) and not getattr(cfg, key) >= 0:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if not 0 <= cfg.seed < 2 ** 32:  # seeds are combined into generator seeds (data.epoch_permutation)
        raise UserError(f"--seed={cfg.seed}: must be in 0..2**32-1")


def resume_at(path, it, cfg, saved, iters="max_iters", unit="step"):
    """A run resumed from `path`, written at `it`, goes on to cfg.<iters>: a UserError if it is already past
    that, else a line saying so and naming each setting that differs from `saved` (the run's asdict(cfg)
    in the checkpoint): a changed --seed, --data or --lr continues another run than the one saved."""
    if it > getattr(cfg, iters):
        raise UserError(f"{path} is at {unit} {it}: nothing to resume with --{iters}={getattr(cfg, iters)}")
    changed = [f"--{k}={v} (was {saved[k]})" for k, v in dataclasses.asdict(cfg).items()
               if k != "resume" and k in saved and repr(saved[k]) != repr(v)]  # repr: nan is nan
    print(f"resumed from {path} at {unit} {it}" + (f"; settings changed: {', '.join(changed)}" if changed else ""))


def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path`: a reader
    (or a run killed at any moment, SIGKILL included) sees the old file or the new one, never half."""
    path = os.path.abspath(path)
    if os.path.isdir(path):  # else os.replace's IsADirectoryError, after the whole write
        raise UserError(f"{path}: a folder, not a file: cannot write there")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-" + os.path.basename(path))
        umask = os.umask(0o22)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600: give the file the mode open() would
    except OSError as e:  # a folder on the way is a file, or read-only
        raise UserError(f"{path}: cannot write there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _KeepEtag(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the X-Linked-Etag of a hop: the hub sends it with the 302 to its CDN,
    whose response does not repeat it."""
    etag = ""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.etag = self.etag or headers.get("X-Linked-Etag", "")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url, path):
    """Download url to path with a progress line. The file appears only when complete (atomic_write),
    its size matching Content-Length and its sha256 the hub's X-Linked-Etag when one is sent (by the
    response or a redirect before it), so an interrupted download is retried, never half-read."""
    def write(f):
        hops = _KeepEtag()
        with urllib.request.build_opener(hops).open(url, timeout=60) as r:
            total, done, sha = int(r.headers.get("Content-Length") or 0), 0, hashlib.sha256()
            etag = (r.headers.get("X-Linked-Etag") or hops.etag).strip('"')
            while chunk := r.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                print(f"\rdownloading {url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB", end="", flush=True)
            print()
            if total and done != total:  # a dropped connection gives a short body, not an error
                raise UserError(f"download {url}: got {done} of {total} bytes; run again to retry")
            if re.fullmatch(r"[0-9a-f]{64}", etag) and sha.hexdigest() != etag:
                raise UserError(f"download {url}: sha256 differs from the hub's; run again to retry")
    try:
        atomic_write(path, write)
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, a timeout, a full disk, a cut chunked body
        raise UserError(f"download {url} failed: {e}") from None


def atomic_save(obj, path):
    """torch.save(obj, path), atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    """json.dump(obj, path), atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def check_out_dir(path):
    """Make --out_dir and write a file into it now, so that a path that is a file or a read-only folder
    is one line before any training, not a traceback at the first checkpoint."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out_dir={path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"--out_dir={path}: cannot write there ({e.strerror})") from None


def metrics_file(out_dir, name, append):
    """out_dir/name, a JSON-lines log, emptied now unless `append` (a resumed run, or a process that does
    not write it): a new run appended to the last one's would plot as one run."""
    path = os.path.join(out_dir, name)
    if not append and os.path.exists(path):
        os.remove(path)
    return path


def append_jsonl(obj, path):
    """Append one JSON line and flush it to disk (a metrics log: a crash loses at most this line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())

# -----------------------------------------------------------------------------
# training: device, precision, optimizer, schedule


def get_device(device="auto", dtype="auto"):
    """auto: CUDA when there is a GPU, else the CPU. A device this machine does not have, or a precision
    it cannot train in (resolve_dtype), is one line before anything loads."""
    name = device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        kind = index = None
    n = torch.cuda.device_count() if kind == "cuda" and torch.cuda.is_available() else 0
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not n:
        built = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
        raise UserError(f"--device={name}: no CUDA GPU on this machine{built}; use --device=cpu")
    if kind == "cuda" and index is not None and index >= n:
        raise UserError(f"--device={name}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    if kind == "cuda" and index is not None:  # CUDA streams, graph capture, synchronize() and memory statistics
        torch.cuda.set_device(index)  # take the current GPU when given none: make it the one named
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name}: no Apple GPU (MPS) on this machine; use --device=cpu")
    resolve_dtype(device, dtype)
    return device


def resolve_dtype(device, dtype="auto"):
    """The one place that picks precision: bf16 on CUDA GPUs that compute in it (Ampere and later: no
    loss scaling needed), fp32 elsewhere, since older GPUs (T4, V100) only emulate bf16, slowly.
    float16 training needs loss scaling, which this repo leaves out: refused."""
    if dtype == "auto":
        native = device.startswith("cuda") and (torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8)
        return "bfloat16" if native else "float32"
    if dtype == "float16":
        raise UserError("--dtype=float16: training in float16 needs loss scaling, which minrlhf leaves out; "
                        "use bfloat16 or float32")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype}: expected auto, float32 or bfloat16")
    return dtype


def autocast(device, dtype="auto"):
    """The training precision as a context: autocast to resolve_dtype(device, dtype), or nothing for fp32."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def compile_for_lengths(fn, on=True, mode="default"):
    """torch.compile(fn) (a function or a module) with every input size symbolic, or fn itself if not
    `on`. Training batches are padded to their longest row (bucketed to a multiple of 64 on CUDA), so
    their length changes from batch to batch: one graph then serves every length and batch size, where
    torch.compile's default compiles for the first shape and again each time another size first changes
    (30-60 s each for GPT-2 small on a GPU). mode: torch.compile's (bench.py tries the others)."""
    return torch.compile(fn, dynamic=True, mode=mode) if on else fn


def sync(device):
    """Wait for the device's queued work (GPU work is asynchronous): a clock read after it counts that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_finite(where, hint="", **values):
    """A UserError naming each of `values` (floats, or 0-dim tensors on one device) that is inf or nan:
    one host sync for all of them."""
    x = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values.values()])
    if not bool(torch.isfinite(x).all()):
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        raise UserError(f"{where}: non-finite {', '.join(bad)}{hint}")


def make_optimizer(params, lr, weight_decay):
    """AdamW with decay on matrices only (not biases, LayerNorms). The fused kernel makes one pass
    over each tensor instead of a dozen: a PPO update of GPT-2 small 1.4x faster on CPU (bench.py)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 fuses on CUDA only
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def load_optimizer(opt, state, where):
    """opt.load_state_dict(state) for --resume, but a moment tensor whose shape does not fit its
    parameter (a checkpoint of another model, or of an older version: the token rows were not yet
    padded) is one line naming the file, not a crash at the first step. The moments and step counts are
    the checkpoint's; the settings of each parameter group (lr, weight decay, ...) stay this run's, as
    resume_at announces them (load_state_dict alone would put the saved --lr back)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, mine in zip(opt.param_groups, settings):
        group.update(mine)
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise UserError(f"{where}: optimizer state {key} of shape {tuple(v.shape)} does not fit its "
                                    f"parameter {tuple(p.shape)}; it cannot be resumed: start again without --resume")


def lr_at(it, lr, warmup, total, min_lr_frac=0.1):
    """The learning rate of step `it` (0-based): a linear warmup over `warmup` steps, then a cosine decay
    to a floor. With m = min_lr_frac and p = min(1, (it - warmup) / max(1, total - warmup)):
    lr * (it + 1) / warmup while it < warmup (never 0, the peak at it = warmup - 1), then
    lr * (m + (1 - m) * (1 + cos(pi * p)) / 2): lr at it = warmup, (1 + m) / 2 * lr halfway, m * lr from `total` on."""
    if it < warmup:
        return lr * (it + 1) / warmup
    frac = min(1.0, (it - warmup) / max(1, total - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
