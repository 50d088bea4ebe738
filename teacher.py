"""Train the bidirectional teacher by flow matching with classifier-free guidance, then sample it
with Euler + CFG and score the samples with the world's exact metrics.

The teacher sees clips with one event per frame; about half of them switch event once at a chunk
boundary (world.py says why). It reports follow and valid on one-event clips, react and
latency on switch clips, and stores the data's natural step (world.natural_step), which Delta
Forcing uses as its unit of motion.

    python teacher.py                       # tiny on CPU, small on a GPU; writes out/teacher.pt
    python teacher.py --preset=tiny --max_steps=200 --resume=True
    torchrun --nproc_per_node=8 teacher.py  # data parallel: the batch is split over 8 GPUs
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (BadInput, adamw, autocast, check_in_sync, cli, compile_, ema_copy, ema_update, init_run,
                    optimizer_step, resume, save_checkpoint, seed_rank, states)
from model import ModelConfig, add_noise, build, cfg_mix, shift_sigma
from world import EVENTS, World, batch_metrics, natural_step, save_video, summarize, teacher_batch


@dataclass
class TeacherConfig:
    preset: str = "tiny"
    out_dir: str = "out"
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    compile: bool = True          # used on CUDA only; CPU stays eager
    # world
    size: int = 16
    sprite: int = 4
    speed: int = 2
    rho: float = 0.9
    frames: int = 8               # teacher clip length = the teacher window of later stages
    chunk: int = 2                # the generator's chunk: switches in teacher clips fall on its boundaries
    p_switch: float = 0.5         # share of teacher clips that switch event once
    # model
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    # optimisation
    max_steps: int = 5000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.998
    p_uncond: float = 0.1         # event dropout to the null event, for CFG
    sigma_mu: float = 0.5         # training levels: sigma = sigmoid(mu + N(0,1)) (logit-normal, SD3), leaning noisy
    # sampling and evaluation
    sample_steps: int = 32
    sample_shift: float = 2.0
    guidance: float = 1.0         # g in cond + g (cond - uncond)
    eval_samples: int = 64
    log_every: int = 100
    ckpt_every: int = 500


# small: one GPU. Its steps are sized so that `reproduce.sh small` (every stage) ends in about 6 min on one
# H100: 2.1 TFLOP per step (bench.py counts it) at an expected 25% MFU is 8.5 ms, 5000 steps 43 s.
PRESETS = {
    "tiny": {},
    "small": dict(size=32, sprite=6, speed=2, frames=12, chunk=3, dim=256, depth=6, heads=8, batch=64,
                  lr=5e-4, max_steps=5000, warmup=300, ema=0.999, ckpt_every=1000),
}


def world_of(cfg):
    return World(size=cfg.size, sprite=cfg.sprite, speed=cfg.speed, rho=cfg.rho)


def model_args(cfg):
    return asdict(ModelConfig(size=cfg.size, patch=cfg.patch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                              n_events=len(EVENTS)))


def fm_loss(model, x0, event, sigma_mu):
    """Flow matching with one level per clip, drawn logit-normal (SD3, Esser et al. 2024).
    Eq. rectified flow (Liu et al. 2022; Lipman et al. 2023): ||v(x_sigma) - (eps - x0)||^2."""
    B = x0.shape[0]
    sigma = torch.sigmoid(sigma_mu + torch.randn(B, device=x0.device))[:, None].expand(-1, x0.shape[1])
    eps = torch.randn_like(x0)
    v = model(add_noise(x0, eps, sigma), sigma, event)
    return ((v.float() - (eps - x0)) ** 2).mean()                 # Rectified flow: velocity loss


def euler_grid(steps, shift=1.0):
    return shift_sigma(torch.linspace(1, 0, steps + 1), shift)


@torch.no_grad()
def sample(model, event, noise, sig, guidance=0.0):
    """Euler on dx/dsigma = v along the decreasing levels sig (e.g. euler_grid), with CFG
    (Ho & Salimans 2022) against the null event for the whole clip. event (B,T) per frame,
    noise (B,T,C,H,W) at level sig[0]."""
    x, B = noise, noise.shape[0]
    null = torch.full_like(event, model.null_event)
    sig = sig.to(noise.device)
    for i in range(len(sig) - 1):
        s = sig[i].expand(B, x.shape[1])
        if guidance:                                                # cond and uncond in one batch
            v_c, v_u = model(x.repeat(2, 1, 1, 1, 1), s.repeat(2, 1), torch.cat([event, null])).chunk(2)
            v = cfg_mix(v_c, v_u, guidance)                         # CFG (Ho & Salimans 2022): cond + g (cond - uncond)
        else:
            v = model(x, s, event)
        x = x + (sig[i + 1] - sig[i]) * v                           # Euler step of the flow ODE
    return x


def eval_events(n, T, chunk):
    """The evaluation clips: n one-event clips (events cycling) and n switch clips (every
    ordered pair of events cycling, the switch at the chunk boundary nearest the middle)."""
    one = (torch.arange(n) % len(EVENTS))[:, None].expand(n, T)
    pairs = [(a, b) for a in range(len(EVENTS)) for b in range(len(EVENTS)) if a != b]
    mid = round(T / 2 / chunk) * chunk
    sw = torch.tensor([[pairs[i % len(pairs)][t >= mid] for t in range(T)] for i in range(n)])
    return one, sw


def evaluate(model, cfg, n, device, seed=1234):
    """Sample n one-event clips and n switch clips with CFG and score them. Its own generator:
    the training stream's RNG is never touched. -> (metrics, one-event samples, switch samples)."""
    gen = torch.Generator().manual_seed(seed)
    one, sw = eval_events(n, cfg.frames, cfg.chunk)
    ev = torch.cat([one, sw])
    noise = torch.randn(2 * n, cfg.frames, 3, cfg.size, cfg.size, generator=gen)
    with autocast(device):
        x = sample(model, ev.to(device), noise.to(device), euler_grid(cfg.sample_steps, cfg.sample_shift), cfg.guidance)
    x, w = x.float().cpu(), world_of(cfg)
    m1 = summarize(batch_metrics(x[:n], one, w, first=1, chunk=cfg.chunk))
    m2 = summarize(batch_metrics(x[n:], sw, w, first=1, chunk=cfg.chunk))
    metrics = {k: m1[k] for k in ("follow", "valid", "jumps", "canon")}
    metrics.update({k: m2[k] for k in ("react", "latency", "identity", "bias")}, switch_valid=m2["valid"])
    return metrics, x[:n], x[n:]


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def train_step(model, ema, opt, x, event, *, step, cfg, world=1):
    """One optimiser step: flow-matching loss, backward, gradients averaged over ranks, clip,
    AdamW, EMA. Returns (loss, gnorm, applied); a non-finite step is skipped on the device
    (common.optimizer_step)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    with autocast(x.device):
        loss = fm_loss(model, x, event, cfg.sigma_mu)
    gnorm, applied = optimizer_step(model, opt, loss, cfg.grad_clip, world)
    ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)    # after a skipped step the weights are unchanged
    return loss, gnorm, applied


def check_teacher(cfg):
    """Every check of the teacher's configuration, before any work."""
    if cfg.frames % cfg.chunk:
        raise BadInput(f"--frames={cfg.frames} must be a multiple of --chunk={cfg.chunk}")
    if cfg.size % cfg.patch:
        raise BadInput(f"--size={cfg.size} must be a multiple of --patch={cfg.patch}")


def main(cfg):
    check_teacher(cfg)
    run = init_run(cfg, cfg.batch)
    path = os.path.join(cfg.out_dir, "teacher.pt")
    model = build(model_args(cfg), device=run.device)              # the same seed: the same weights on every rank
    ema = ema_copy(model)
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)                   # the data stream, saved for resume
    w = world_of(cfg)
    m_nat = natural_step(w, cfg.frames, cfg.chunk)
    ck = resume(cfg, path, "teacher", "python teacher.py", gen, model=model, ema=ema, optimizer=opt)
    step, skipped = (ck["step"], ck["skipped"]) if ck else (0, 0)
    seed_rank(run, cfg.seed, step, gen)
    compile_(model, cfg.compile and run.device.type == "cuda")
    if run.rank == 0:
        print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.frames}x{cfg.size}x{cfg.size}"
              f" clips ({cfg.p_switch:.0%} switching), speed {cfg.speed}, natural step {m_nat:.2f}, device {run.device}"
              + (f", {run.world} data-parallel ranks x batch {run.batch}" if run.world > 1 else ""))

    def checkpoint(next_step, metrics=None):
        if run.rank == 0:                                           # one writer; every rank holds the same weights
            save_checkpoint(path, dict(stage="teacher", model_args=model_args(cfg), world=asdict(w), natural_step=m_nat,
                                       config=asdict(cfg), step=next_step, skipped=int(skipped), metrics=metrics or {},
                                       **states(gen, model=model, ema=ema, optimizer=opt)))

    t0, t_start = time.time(), time.time()
    for step in tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc="teacher", mininterval=5,
                     disable=run.rank > 0):
        x, event = teacher_batch(w, run.batch, cfg.frames, gen, cfg.chunk, cfg.p_switch)
        drop = torch.rand(run.batch, generator=gen) < cfg.p_uncond  # CFG: the null event for the whole clip
        event = torch.where(drop[:, None], model.null_event, event)
        x, event = (a.to(run.device, non_blocking=True) for a in (x, event))   # no stream synchronize after the copy
        loss, gnorm, applied = train_step(model, ema, opt, x, event, step=step, cfg=cfg, world=run.world)
        skipped = skipped + ~applied                                # counted on the device: no sync per step
        if (step + 1) % cfg.log_every == 0 and run.rank == 0:
            dt = (time.time() - t0) / cfg.log_every                 # loss.item() syncs once per log line only
            tqdm.write(f"step {step + 1} | loss {loss.item():.4f} | gnorm {gnorm:.2f} | lr {lr_at(step, cfg):.2e} | "
                       f"{dt * 1000:.0f} ms/step | {cfg.batch / dt:.0f} clips/s | skipped {int(skipped)}")
            t0 = time.time()
        if (step + 1) % cfg.ckpt_every == 0 and run.rank == 0:
            m, _, _ = evaluate(ema, cfg, 20, run.device)            # a quick look at progress
            tqdm.write(f"step {step + 1} | ema samples: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
            checkpoint(step + 1)                                    # the checkpoint holds the next step to run
    check_in_sync(model, run)
    if run.rank > 0:
        return
    train_min = (time.time() - t_start) / 60
    metrics, one, sw = evaluate(ema, cfg, min(cfg.eval_samples, max(10, cfg.max_steps)), run.device)
    metrics["train_minutes"] = train_min
    print("teacher samples: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    checkpoint(cfg.max_steps, metrics)
    save_video(os.path.join(cfg.out_dir, "teacher_samples.gif"), torch.cat(list(one[:5]) + list(sw[:5]), -1))
    print(f"wrote {path} and {cfg.out_dir}/teacher_samples.gif")


if __name__ == "__main__":
    cli(main, TeacherConfig, PRESETS)
