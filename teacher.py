"""Train the bidirectional teacher by flow matching with classifier-free guidance, then sample it
with Euler + CFG and score the samples with the world's exact metrics.

The teacher sees clips with one event per frame; about half of them switch event once at a chunk
boundary (world.py says why). It reports follow and valid on one-event clips, react and
latency on switch clips, and stores the data's natural step (world.natural_step), which Delta
Forcing uses as its unit of motion.

    python teacher.py                       # tiny on CPU, small on a GPU; writes out/teacher.pt
    python teacher.py --resume=True         # continue from out/teacher.pt
    python teacher.py --max_steps=2         # a smoke run: every loop capped
    torchrun --nproc_per_node=8 teacher.py  # data parallel: the batch is split over 8 GPUs
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (adamw, autocast, check_in_sync, checkpointer, compile_, ema_copy, ema_update, init_run,
                    optimizer_step, resume, seed_rank)
from config import BadInput, Count, NonNegative, OneOf, Positive, Prob, Real, RunConfig, Whole, capped, cli
from metrics import clip_scores
from model import ModelConfig, add_noise, build, forward_with_cfg, shift_sigma
from world import EVENTS, World, eval_events, natural_step, save_video, teacher_batch


@dataclass
class TeacherConfig(RunConfig):
    # world
    size: Count = 16              # frame side in pixels
    sprite: Count = 4             # sprite side in pixels
    speed: Count = 2              # pixels per frame of a moving event
    rho: Prob = 0.9               # P(sprite colour = the first event's canonical colour): the planted bias
    palette: OneOf("band", "saturated") = "band"   # sprite colours: band (a recolour small against a step) | saturated
    frames: Count = 8             # teacher clip length = the teacher window of later stages
    chunk: Count = 2              # the generator's chunk: switches in teacher clips fall on its boundaries
    p_switch: Prob = 0.5          # share of teacher clips that switch event once
    # model
    patch: Count = 4              # tokens are patch x patch pixels
    dim: Count = 128              # transformer width
    depth: Count = 4              # transformer blocks
    heads: Count = 4              # attention heads (dim / heads must be even)
    # optimisation
    steps: Count = 5000           # optimiser steps (the learning-rate schedule's length)
    batch: Count = 32             # clips per step (the global batch under torchrun)
    lr: Positive = 3e-3           # peak learning rate
    warmup: Whole = 200           # linear warm-up steps, then cosine decay to 10%
    weight_decay: NonNegative = 0.01  # AdamW weight decay
    grad_clip: Positive = 1.0     # gradient-norm clip
    ema_decay: Prob = 0.998       # EMA decay of the weights (from the end of warm-up)
    p_uncond: Prob = 0.1          # event dropout to the null event, for CFG
    sigma_mu: Real = 0.5          # training levels: sigma = sigmoid(mu + N(0,1)) (logit-normal, SD3), leaning noisy
    p_frame: Prob = 0.5           # share of clips whose frames draw their levels independently (Diffusion Forcing)
    # sampling and evaluation
    sample_steps: Count = 32      # Euler steps of the sampler
    sample_shift: Positive = 2.0  # time shift of the sampler's grid
    guidance: NonNegative = 1.0   # g in cond + g (cond - uncond)
    eval_samples: Count = 64      # clips of each kind (one-event, switch) in the final evaluation
    log_every: Count = 100        # steps between log lines
    ckpt_every: Count = 500       # steps between checkpoints (and a quick 20-clip evaluation)
    renamed = {"ema": "ema_decay"}


# small: one GPU, sized for about 6 min of the whole chain on one H100 (docs/defaults.md)
PRESETS = {
    "tiny": {},
    "small": dict(size=32, sprite=6, speed=2, frames=12, chunk=3, dim=256, depth=6, heads=8, batch=64,
                  lr=5e-4, steps=5000, warmup=300, ema_decay=0.999, ckpt_every=1000),
}


def world_of(cfg):
    return World(size=cfg.size, sprite=cfg.sprite, speed=cfg.speed, rho=cfg.rho, palette=cfg.palette)


def model_args(cfg):
    return asdict(ModelConfig(size=cfg.size, patch=cfg.patch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                              n_events=len(EVENTS)))


def fm_loss(model, x0, event, sigma_mu, p_frame=0.0):
    """Flow matching with one level per clip, drawn logit-normal (SD3, Esser et al. 2024); in a
    share p_frame of the clips each frame draws its own level (Diffusion Forcing, Chen et al. 2024).
    Eq. rectified flow (Liu et al. 2022; Lipman et al. 2023): ||v(x_sigma) - (eps - x0)||^2."""
    B, T = x0.shape[:2]
    per_frame = torch.rand(B, 1, device=x0.device) < p_frame                     # (B,1)
    z = torch.where(per_frame, torch.randn(B, T, device=x0.device), torch.randn(B, 1, device=x0.device))   # (B,T)
    sigma = torch.sigmoid(sigma_mu + z)                             # Diffusion Forcing: per-frame levels
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
    sig = sig.to(noise.device)
    for i in range(len(sig) - 1):
        v = forward_with_cfg(model, x, sig[i].expand(B, x.shape[1]), event, guidance)   # CFG: cond + g (cond - uncond)
        x = x + (sig[i + 1] - sig[i]) * v                           # Euler step of the flow ODE
    return x


def evaluate(model, cfg, n, device, seed=1234):
    """Sample n one-event clips and n switch clips with CFG and score them. Its own generator:
    the training stream's RNG is never touched. -> (metrics, one-event samples, switch samples)."""
    gen = torch.Generator().manual_seed(seed)
    one, sw = eval_events(n, cfg.frames, cfg.chunk)
    ev = torch.cat([one, sw])
    noise = torch.randn(2 * n, cfg.frames, 3, cfg.size, cfg.size, generator=gen)
    with autocast(device):
        x = sample(model, ev.to(device), noise.to(device), euler_grid(cfg.sample_steps, cfg.sample_shift), cfg.guidance)
    x = x.float().cpu()
    return clip_scores(x, one, sw, world_of(cfg), first=1, chunk=cfg.chunk), x[:n], x[n:]


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def train_step(model, ema, opt, x, event, *, step, cfg, n_ranks=1):
    """One optimiser step: flow-matching loss, backward, gradients averaged over ranks, clip,
    AdamW, EMA. Returns (loss, gnorm, applied); a non-finite step is skipped (common.optimizer_step)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    with autocast(x.device):
        loss = fm_loss(model, x, event, cfg.sigma_mu, cfg.p_frame)
    gnorm, applied = optimizer_step(model, opt, loss, cfg.grad_clip, n_ranks)
    ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
    return loss, gnorm, applied


def check_teacher(cfg):
    """Every check of the teacher's configuration, before any work."""
    if cfg.frames % cfg.chunk:
        raise BadInput(f"--frames={cfg.frames} must be a multiple of --chunk={cfg.chunk}")
    if cfg.size % cfg.patch:
        raise BadInput(f"--size={cfg.size} must be a multiple of --patch={cfg.patch}")
    if cfg.sprite > cfg.size:
        raise BadInput(f"--sprite={cfg.sprite} must fit in a frame of --size={cfg.size}")
    if cfg.dim % (2 * cfg.heads):
        raise BadInput(f"--dim={cfg.dim} must split into --heads={cfg.heads} heads of an even width")


def main(cfg):
    check_teacher(cfg)
    run = init_run(cfg, cfg.batch)
    path = os.path.join(cfg.out_dir, "teacher.pt")
    model = build(model_args(cfg), device=run.device)               # the same seed: the same weights on every rank
    ema = ema_copy(model)
    compile_(model, cfg.compile and run.device.type == "cuda")
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)                   # the data stream, saved for resume
    w = world_of(cfg)
    m_nat = natural_step(w, cfg.frames, cfg.chunk)
    ck = resume(cfg, path, "teacher", "python teacher.py", gen, model=model, ema=ema, optimizer=opt)
    step, skipped = (ck["step"], ck["skipped"]) if ck else (0, 0)
    seed_rank(run, cfg.seed, step, gen)
    n_steps = capped(cfg.steps, cfg)
    save = checkpointer(path, run, gen, dict(stage="teacher", model_args=model_args(cfg), world=asdict(w), natural_step=m_nat,
                                             config=asdict(cfg), total=n_steps), model=model, ema=ema, optimizer=opt)
    if run.rank == 0:
        print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.frames}x{cfg.size}x{cfg.size}"
              f" clips ({cfg.p_switch:.0%} switching), speed {cfg.speed}, natural step {m_nat:.2f}, device {run.device}"
              + (f", {run.n_ranks} data-parallel ranks x batch {run.batch}" if run.n_ranks > 1 else ""))

    t0, t_start = time.time(), time.time()
    for step in tqdm(range(step, n_steps), initial=step, total=n_steps, desc="teacher", mininterval=5,
                     disable=run.rank > 0):
        x, event = teacher_batch(w, run.batch, cfg.frames, gen, cfg.chunk, cfg.p_switch)
        drop = torch.rand(run.batch, generator=gen) < cfg.p_uncond  # CFG: the null event for the whole clip
        event = torch.where(drop[:, None], model.null_event, event)
        x, event = (a.to(run.device, non_blocking=True) for a in (x, event))   # no stream synchronize after the copy
        loss, gnorm, applied = train_step(model, ema, opt, x, event, step=step, cfg=cfg, n_ranks=run.n_ranks)
        skipped += not applied
        if (step + 1) % cfg.log_every == 0 and run.rank == 0:
            dt = (time.time() - t0) / cfg.log_every
            tqdm.write(f"step {step + 1} | loss {loss.item():.4f} | gnorm {gnorm:.2f} | lr {lr_at(step, cfg):.2e} | "
                       f"{dt * 1000:.0f} ms/step | {cfg.batch / dt:.0f} clips/s | skipped {skipped}")
            t0 = time.time()
        if (step + 1) % cfg.ckpt_every == 0 and run.rank == 0:
            m, _, _ = evaluate(ema, cfg, 20, run.device)            # a quick look at progress
            tqdm.write(f"step {step + 1} | ema samples: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
            save(step=step + 1, skipped=skipped, metrics={})   # the checkpoint holds the next step to run
    check_in_sync(model, run)
    if run.rank > 0:
        return
    train_min = (time.time() - t_start) / 60
    metrics, one, sw = evaluate(ema, cfg, capped(cfg.eval_samples, cfg, floor=10), run.device)
    metrics["train_minutes"] = train_min
    print("teacher samples: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    save(step=n_steps, skipped=skipped, metrics=metrics)
    save_video(os.path.join(cfg.out_dir, "teacher_samples.gif"), torch.cat(list(one[:5]) + list(sw[:5]), -1))
    print(f"wrote {path} and {cfg.out_dir}/teacher_samples.gif")


if __name__ == "__main__":
    cli(main, TeacherConfig, PRESETS)
