"""Train the bidirectional teacher by flow matching with classifier-free guidance, then sample it
with Euler + CFG and score the samples with the world's exact metrics (DESIGN section 5).

    python teacher.py                       # tiny on CPU, small on a GPU; writes out/teacher.pt
    python teacher.py --preset=tiny --max_steps=200 --resume=True
    torchrun --nproc_per_node=8 teacher.py  # data parallel: the batch is split over 8 GPUs
"""
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from model import (add_noise, average_gradients, build, cfg_mix, check_in_sync, check_writable, cli, ema_update,
                   load_checkpoint, maybe_compile, per_rank, pick_device, save_checkpoint, setup_distributed,
                   shift_sigma)
from world import EVENTS, batch_metrics, save_video, summarize, teacher_batch


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
    speed: int = 1
    rho: float = 0.9
    frames: int = 8               # teacher clip length = the teacher window of later stages
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


PRESETS = {
    "tiny": {},
    "small": dict(size=32, sprite=6, speed=2, frames=12, dim=256, depth=6, heads=8, batch=64,
                  lr=5e-4, max_steps=8000, warmup=500, ema=0.999),
}


def fm_loss(model, x0, event, cfg):
    """Flow matching with one level per clip. Eq. (rectified flow; Liu 2022, Lipman 2023): ||v - (eps - x0)||^2."""
    B = x0.shape[0]
    sigma = torch.sigmoid(cfg.sigma_mu + torch.randn(B, device=x0.device))[:, None].expand(-1, x0.shape[1])
    eps = torch.randn_like(x0)
    v = model(add_noise(x0, eps, sigma), sigma, event)
    return ((v.float() - (eps - x0)) ** 2).mean()                 # Eq. flow-matching velocity loss


def euler_grid(steps, shift=1.0):
    return shift_sigma(torch.linspace(1, 0, steps + 1), shift)


@torch.no_grad()
def sample(model, event, noise, sig, guidance=0.0):
    """Euler on dx/dsigma = v along the decreasing levels sig (e.g. euler_grid), with CFG.
    event (B,), noise (B,T,C,H,W) at level sig[0]."""
    x, B = noise, noise.shape[0]
    null = torch.full_like(event, model.null_event)
    sig = sig.to(noise.device)
    for i in range(len(sig) - 1):
        s = sig[i].expand(B, x.shape[1])
        if guidance:                                                # cond and uncond in one batch
            v_c, v_u = model(x.repeat(2, 1, 1, 1, 1), s.repeat(2, 1), torch.cat([event, null])).chunk(2)
            v = cfg_mix(v_c, v_u, guidance)
        else:
            v = model(x, s, event)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def evaluate(model, cfg, n, device, seed=1234):
    """Sample n clips (events cycling) with CFG and score them; also returns the samples."""
    gen = torch.Generator().manual_seed(seed)
    event = torch.arange(n) % len(EVENTS)
    noise = torch.randn(n, cfg.frames, 3, cfg.size, cfg.size, generator=gen)
    with autocast(device):
        x = sample(model, event.to(device), noise.to(device), euler_grid(cfg.sample_steps, cfg.sample_shift), cfg.guidance)
    per = batch_metrics(x.float().cpu(), event[:, None].expand(n, cfg.frames), cfg, first=1)
    return summarize(per), x.float().cpu()


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def optimizer_step(model, opt, loss, grad_clip, world=1):
    """backward, gradients averaged over ranks, clip, step; every stage's updates go through it.
    Returns (gnorm, applied): a non-finite loss or gradient skips the step on every rank alike
    (they share the averaged gradients) and never poisons the weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model, world)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(gnorm):                                   # syncs once per step: the price of the skip
        opt.zero_grad(set_to_none=True)
        return gnorm, False
    opt.step()
    return gnorm, True


def train_step(fwd, model, ema, opt, x, event, step, cfg, world=1):
    """One optimiser step: flow-matching loss, backward, gradients averaged over ranks, clip,
    AdamW, EMA. fwd is the (maybe compiled) model. Returns (loss, gnorm, applied): a non-finite
    loss or gradient skips the update, on every rank alike, and never poisons the weights."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    with autocast(x.device):
        loss = fm_loss(fwd, x, event, cfg)
    gnorm, applied = optimizer_step(model, opt, loss, cfg.grad_clip, world)
    if applied:
        ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)
    return loss, gnorm, applied


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def main(cfg):
    rank, world, local = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, local)
    check_writable(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "teacher.pt")
    batch = per_rank(cfg.batch, world)
    model = build(cfg, device=device)                               # the same seed: the same weights on every rank
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)                   # the data stream, saved for resume
    step, skipped = 0, 0
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, ["teacher"], "python teacher.py")
        model.load_state_dict(ck["model"]); ema.load_state_dict(ck["ema"]); opt.load_state_dict(ck["optimizer"])
        step, skipped = ck["step"], ck.get("skipped", 0)
        gen.set_state(ck["gen"]); torch.set_rng_state(ck["rng"])
        print(f"resumed {path} at step {step}")
    if rank:                                                        # other ranks draw their own data and noise
        gen.manual_seed(cfg.seed + 1000 * rank + step); torch.manual_seed(cfg.seed + 1000 * rank + step)
    fwd = maybe_compile(model, cfg.compile and device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"teacher: {n_params / 1e6:.2f}M params, {cfg.frames}x{cfg.size}x{cfg.size} clips, device {device}"
              + (f", {world} data-parallel ranks x batch {batch}" if world > 1 else ""))

    def checkpoint(metrics=None):
        if rank == 0:                                               # one writer; every rank holds the same weights
            save_checkpoint(path, dict(stage="teacher", model=model.state_dict(), ema=ema.state_dict(),
                                       optimizer=opt.state_dict(), config=asdict(cfg), step=step, skipped=skipped,
                                       metrics=metrics or {}, gen=gen.get_state(), rng=torch.get_rng_state()))

    t0, t_start = time.time(), time.time()
    for step in tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc="teacher", mininterval=5,
                     disable=rank > 0):
        x, event = teacher_batch(cfg, batch, cfg.frames, gen)
        drop = torch.rand(batch, generator=gen) < cfg.p_uncond
        event = torch.where(drop, model.null_event, event)
        loss, gnorm, applied = train_step(fwd, model, ema, opt, x.to(device), event.to(device), step, cfg, world)
        skipped += not applied                                      # a non-finite step is skipped and counted
        if (step + 1) % cfg.log_every == 0 and rank == 0:
            dt = (time.time() - t0) / cfg.log_every                 # loss.item() syncs once per log line only
            tqdm.write(f"step {step + 1} | loss {loss.item():.4f} | gnorm {gnorm:.2f} | lr {lr_at(step, cfg):.2e} | "
                       f"{dt * 1000:.0f} ms/step | {cfg.batch / dt:.0f} clips/s | skipped {skipped}")
            t0 = time.time()
        if (step + 1) % cfg.ckpt_every == 0 and rank == 0:
            m, _ = evaluate(ema, cfg, 20, device)                   # a quick look at progress
            tqdm.write(f"step {step + 1} | ema samples: follow {m['follow']:.3f} valid {m['valid']:.3f} canon {m['canon']:.3f}")
            step += 1                                               # the checkpoint holds the next step to run
            checkpoint()
            step -= 1
    step = cfg.max_steps
    check_in_sync(model, rank, world)
    if rank > 0:
        return
    train_min = (time.time() - t_start) / 60
    metrics, samples = evaluate(ema, cfg, cfg.eval_samples, device)
    metrics["train_minutes"] = train_min
    print("teacher samples: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    checkpoint(metrics)
    save_video(os.path.join(cfg.out_dir, "teacher_samples.gif"), torch.cat(list(samples[:10]), -1))
    print(f"wrote {path} and {cfg.out_dir}/teacher_samples.gif")


if __name__ == "__main__":
    cli(main, TeacherConfig, PRESETS)
