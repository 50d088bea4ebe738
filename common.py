"""Run plumbing that is in no paper: devices and autocast, torchrun data parallel, the optimizer
step, EMA, and checkpoints. Every stage imports it (and config.py).

    run = init_run(cfg, cfg.batch)                              # rank, number of ranks, device, seed, out_dir checked
    save = checkpointer(path, run, gen, dict(stage="teacher", ...), model=model, ema=ema, optimizer=opt)
    ck = resume(cfg, path, "teacher", hint, gen, model=model, ema=ema, optimizer=opt)

One checkpoint schema for every stage: {stage, format, model_args, world, stream?, config, model,
ema, optimizer, critic?, step, metrics, rng, gen?, ...}: `model_args` rebuilds the network, `world`
the toy world, `stream` the generator's streaming setup, `config` the stage's dataclass as a dict.
"""
import copy
import datetime
import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass

import torch

from config import BadInput


# ----------------------------------------------------------------------------- device, precision, compile

def pick_device(name, local_rank=0, precision="auto", interactive=False):
    """cuda (this process's GPU under torchrun), else mps, else cpu; TF32 matmuls on CUDA; --precision."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)
    set_precision(precision, device, interactive)
    return device


@functools.cache
def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:                                              # not Linux: no way to tell, stay fp32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


BF16 = {"cuda": True}    # device type -> bf16 autocast on or not; the CPU starts in fp32 until set_precision


def set_precision(precision, device, interactive=False):
    """--precision: bf16 or fp32 autocast everywhere. auto: bf16 on CUDA and on a CPU that multiplies bf16
    natively, but fp32 for an interactive run on a CPU (interactive=True: sample.py and the web page, one
    video streamed at batch 1, where bf16's casts cost more than its small matmuls save; docs/performance.md);
    fp32 elsewhere. Training and evaluation never depend on it. Weights, gradients and optimizer state stay
    fp32 either way (autocast casts per op)."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    small = interactive and device.type == "cpu"
    BF16[device.type] = precision == "bf16" or (precision == "auto" and native and not small)


def autocast(device):
    """bf16 autocast where set_precision put it (no GradScaler needed: bf16 keeps fp32's range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=BF16.get(device.type, False))


def compile_(module, enabled, **kw):
    """Compile in place (nn.Module.compile), so state_dicts carry no `_orig_mod.` prefix. A stage
    traces more graphs (bidirectional, block-causal, streaming with each cache state, grad or not)
    than dynamo's default limit of 8, past which it would silently fall back to eager."""
    if enabled:
        torch._dynamo.config.recompile_limit = 64
        module.compile(**kw)
    return module


# ----------------------------------------------------------------------------- the run: torchrun, device, seed
# `torchrun --nproc_per_node=N teacher.py|distill.py|longtune.py` runs N data-parallel processes;
# plain `python` is rank 0 of 1 and never touches torch.distributed. Every rank holds the same
# weights and draws its own data; gradients are averaged by hand, because the Self Forcing rollout
# runs the generator several times before one backward, which DDP's bookkeeping does not allow.

@dataclass
class Run:
    rank: int
    n_ranks: int
    device: torch.device
    batch: int            # this rank's share of the global batch


def init_run(cfg, batch):
    """torchrun (if any), device, the seed, and a writable out_dir: what a stage does first. Every
    rank starts from the same seed, so models are built alike; seed_rank() then splits the data."""
    rank, n_ranks, local = 0, 1, 0
    if "RANK" in os.environ:
        import torch.distributed as dist
        gpu = torch.cuda.is_available() and (cfg.device == "auto" or cfg.device.startswith("cuda"))
        if not dist.is_initialized():   # an hour: the other ranks wait at config.cli's final barrier for rank 0's evaluation
            dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=1))
        rank, n_ranks, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if batch % n_ranks:
        raise BadInput(f"--batch={batch} does not split over {n_ranks} processes; use a multiple of {n_ranks}")
    try:                                                         # fail now, not at the first checkpoint
        os.makedirs(cfg.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()
    except OSError as e:
        raise BadInput(f"cannot write checkpoints to --out_dir={cfg.out_dir}: {e.strerror or e}") from None
    torch.manual_seed(cfg.seed)
    return Run(rank, n_ranks, pick_device(cfg.device, local, cfg.precision), batch // n_ranks)


def seed_rank(run, seed, step, gen=None):
    """Ranks other than 0 draw their own data and noise from here on."""
    if run.rank:
        torch.manual_seed(seed + 1000 * run.rank + step)
        if gen is not None:
            gen.manual_seed(seed + 1000 * run.rank + step)


def check_file(flag, path):
    """Fail now, not after the work: --flag=path, if given, must be a file we can write."""
    try:
        open(path, "a").close() if path else None
    except OSError as e:
        raise BadInput(f"cannot write --{flag}={path}: {e.strerror or e}") from None


def check_in_sync(model, run):
    """After training under torchrun: each rank prints a digest of its weights; rank 0 compares them."""
    if run.n_ranks == 1:
        return
    digest = hashlib.sha256(b"".join(v.float().cpu().numpy().tobytes() for v in model.state_dict().values()))
    digests = [None] * run.n_ranks
    torch.distributed.all_gather_object(digests, digest.hexdigest()[:16])
    print(f"rank {run.rank}/{run.n_ranks}: weights sha256 {digests[run.rank]}", flush=True)
    if run.rank == 0:
        print(f"data parallel: weights {'identical' if len(set(digests)) == 1 else 'DIFFERENT'} on all {run.n_ranks} ranks")


# ----------------------------------------------------------------------------- optimisation

def adamw(params, **kw):
    """AdamW, fused: one kernel per update."""
    return torch.optim.AdamW(params, fused=True, **kw)


def optimizer_step(model, opt, loss, grad_clip, n_ranks=1):
    """backward, gradients averaged over ranks, clip, step: every update of every stage. A non-finite
    loss or gradient skips the update on every rank alike, never poisoning the weights. -> (gnorm, applied)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if n_ranks > 1:                                              # all-reduce the gradients as one flat buffer
        params = [p for p in model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in params])
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, flat.div_(n_ranks).split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    applied = bool(torch.isfinite(gnorm))                        # one host read per update
    if applied:
        opt.step()
    return gnorm, applied


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)


def ema_copy(model):
    """A frozen copy of model, to hold the exponential moving average of its weights."""
    return copy.deepcopy(model).requires_grad_(False)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, ckpt):
    """Atomic: write a temp file, then rename, so a kill at any moment leaves the last good one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, stages, hint):
    """Load and check a checkpoint; every failure is one clear line naming the command that fixes it."""
    if not os.path.exists(path):
        raise BadInput(f"checkpoint {path} not found; make it with `{hint}`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); remake it with `{hint}`") from None
    stage = ck.get("stage") if isinstance(ck, dict) else None
    if stage not in stages:
        raise BadInput(f"{path} is a {stage or 'unknown'} checkpoint, not {' or '.join(stages)}; make one with `{hint}`")
    if ck.get("format") != FORMAT:
        raise BadInput(f"{path} was written by an older version of this code; remake it with `{hint}`")
    return ck


FORMAT = 2   # the checkpoint schema's version: a checkpoint of another one is refused


def states(gen=None, **objs):
    """The resumable part of a checkpoint: each named module's or optimizer's state, and the RNGs."""
    out = {k: v.state_dict() for k, v in objs.items()}
    out["rng"] = torch.get_rng_state()
    if gen is not None:
        out["gen"] = gen.get_state()
    return out


def checkpointer(path, run, gen, header, **objs):
    """A stage's one checkpoint writer: save(**fields) writes header + fields + every named state
    (model=, ema=, optimizer=, ...) + the RNGs, on rank 0 only (every rank holds the same weights)."""
    def save(**fields):
        if run.rank == 0:
            save_checkpoint(path, dict(header, format=FORMAT, **fields, **states(gen, **objs)))
    return save


def resume(cfg, path, stage, hint, gen=None, **objs):
    """With --resume=True and a checkpoint at path: restore what checkpointer saved and return the
    checkpoint; otherwise None (a fresh start)."""
    if not (cfg.resume and os.path.exists(path)):
        return None
    ck = load_checkpoint(path, [stage], hint)
    for key, obj in objs.items():
        obj.load_state_dict(ck[key])
    torch.set_rng_state(ck["rng"])
    if gen is not None:
        gen.set_state(ck["gen"])
    print(f"resumed {path} at step {ck['step']}" + (f" ({ck['phase']})" if "phase" in ck else ""))
    return ck
