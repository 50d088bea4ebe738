"""Train the bidirectional teacher by flow matching with classifier-free guidance, then sample it
with Euler + CFG and score the samples with the world's exact metrics (DESIGN section 5).

    python teacher.py                       # tiny on CPU, small on a GPU; writes out/teacher.pt
    python teacher.py --preset=tiny --max_steps=200 --resume=True
"""
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from model import (add_noise, build, cfg_mix, cli, ema_update, load_checkpoint, pick_device,
                   save_checkpoint, shift_sigma)
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


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def main(cfg):
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    path = os.path.join(cfg.out_dir, "teacher.pt")
    model = build(cfg, device=device)
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
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params / 1e6:.2f}M params, {cfg.frames}x{cfg.size}x{cfg.size} clips, device {device}")

    def checkpoint(metrics=None):
        save_checkpoint(path, dict(stage="teacher", model=model.state_dict(), ema=ema.state_dict(),
                                   optimizer=opt.state_dict(), config=asdict(cfg), step=step, skipped=skipped,
                                   metrics=metrics or {}, gen=gen.get_state(), rng=torch.get_rng_state()))

    t0, t_start = time.time(), time.time()
    for step in tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc="teacher", mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, event = teacher_batch(cfg, cfg.batch, cfg.frames, gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.p_uncond
        event = torch.where(drop, model.null_event, event)
        with autocast(device):
            loss = fm_loss(fwd, x.to(device), event.to(device), cfg)
        if not torch.isfinite(loss):                                # skip and count, never poison the weights
            skipped += 1
            opt.zero_grad(set_to_none=True)
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)
        if (step + 1) % cfg.log_every == 0:
            dt = (time.time() - t0) / cfg.log_every                 # loss.item() syncs once per log line only
            tqdm.write(f"step {step + 1} | loss {loss.item():.4f} | gnorm {gnorm:.2f} | lr {lr_at(step, cfg):.2e} | "
                       f"{dt * 1000:.0f} ms/step | {cfg.batch / dt:.0f} clips/s | skipped {skipped}")
            t0 = time.time()
        if (step + 1) % cfg.ckpt_every == 0:
            m, _ = evaluate(ema, cfg, 20, device)                   # a quick look at progress
            tqdm.write(f"step {step + 1} | ema samples: follow {m['follow']:.3f} valid {m['valid']:.3f} canon {m['canon']:.3f}")
            step += 1                                               # the checkpoint holds the next step to run
            checkpoint()
            step -= 1
    step = cfg.max_steps
    train_min = (time.time() - t_start) / 60
    metrics, samples = evaluate(ema, cfg, cfg.eval_samples, device)
    metrics["train_minutes"] = train_min
    print("teacher samples: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    checkpoint(metrics)
    save_video(os.path.join(cfg.out_dir, "teacher_samples.gif"), torch.cat(list(samples[:10]), -1))
    print(f"wrote {path} and {cfg.out_dir}/teacher_samples.gif")


if __name__ == "__main__":
    cli(main, TeacherConfig, PRESETS)
