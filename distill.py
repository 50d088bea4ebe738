"""Distil the bidirectional teacher into a causal, 4-step, streaming generator.

Phase 1, ODE init (CausVid, Yin et al. 2025): regress the causal student onto teacher Euler
trajectories, each chunk at its own level, through the block-causal mask.
Phase 2, Self Forcing DMD (Huang et al. 2025): roll the student out through its KV cache exactly
as at inference, and push its samples toward the teacher's distribution with distribution
matching distillation (DMD, Yin et al. 2024; DMD2's two time scales for the critic).

Both phases draw per-stream event schedules, half of them with a switch, and the teacher and
critic see each frame's own event: the student can only learn to react from data that switches.

    python distill.py                       # the main job: trains the teacher first if it is missing
    python distill.py --max_steps=2         # a smoke run: every loop capped, a minute on a CPU
    torchrun --nproc_per_node=8 distill.py  # data parallel (the teacher must exist: torchrun teacher.py first)
"""
import dataclasses
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import teacher as teacher_stage
from common import (adamw, autocast, check_in_sync, checkpointer, compile_, ema_copy, ema_update, init_run,
                    load_checkpoint, optimizer_step, resume, seed_rank)
from config import BadInput, Count, NonNegative, Positive, Prob, RunConfig, Sigmas, SwitchCache, Whole, capped, cli
from metrics import clip_scores
from model import add_noise, build, cfg_mix, cond_uncond, pred_x0, shift_sigma
from streaming import KVCache, rollout
from world import World, eval_events, random_events, save_strip, save_video


@dataclass
class DMDConfig(RunConfig):
    """DMD's knobs, shared by this stage and long tuning (longtune.py changes some defaults)."""
    dmd_steps: Whole = 150         # generator updates, each after critic_ratio critic updates
    critic_ratio: Count = 5        # DMD2 / Self Forcing: 5 critic updates per generator update
    batch: Count = 16              # rollouts per update (the global batch under torchrun)
    lr: Positive = 5e-5            # the generator's learning rate
    critic_lr: Positive = 1e-5     # a fifth of the generator's, as Self Forcing and LongLive (critic / generator: 4e-7 / 2e-6; 2e-6 / 1e-5)
    guidance: NonNegative = 1.0    # g of the real score: cond + g (cond - uncond) (Self Forcing: 3; docs/defaults.md)
    grad_clip: Positive = 10.0     # gradient-norm clip
    ema_decay: Prob = 0.99         # EMA decay of the generator
    ema_start: Whole = 50          # updates before the EMA starts averaging (Self Forcing: a third of the way in)
    log_every: Count = 10          # updates between log lines and checkpoints
    renamed = {"ema": "ema_decay"}


@dataclass
class DistillConfig(DMDConfig):
    teacher: str = ""              # teacher checkpoint; default out_dir/teacher.pt, trained first if missing
    # the student
    chunk: Count = 2               # frames per autoregressive chunk
    timesteps: Sigmas = "1,0.75,0.5,0.25"  # the few-step noise levels before the shift (Self Forcing's 1000, 750, 500, 250)
    shift: Positive = 5.0          # time shift of the levels and the DMD sigma draw, as Self Forcing
    n_sink: Whole = 2              # KV-cache sink: the first frames, kept for ever
    n_window: Count = 2            # KV-cache rolling window: the last frames (shorter than the teacher's window, as LongLive's)
    p_switch: Prob = 0.5           # share of ODE pairs and rollouts whose schedule switches once
    switch_cache: SwitchCache = "recache_window"   # the rollouts' cache at a switch
    # phase 1: ODE init
    ode_pairs: Count = 512         # teacher trajectories
    ode_steps: Whole = 600         # regression steps
    ode_lr: Positive = 3e-4        # learning rate of the regression
    # phase 2: DMD, with DMDConfig's knobs
    eval_samples: Count = 64       # clips of each kind in the final evaluation


# small: one GPU, sized for about 6 min of the whole chain on one H100 (docs/defaults.md)
PRESETS = {"tiny": {}, "small": dict(ode_pairs=1024, ode_steps=1000, dmd_steps=160, ema_start=50, batch=32, chunk=3,
                                     n_sink=3, n_window=3, log_every=40)}


def stream_args(cfg, window):
    """The generator's streaming setup, stored in its checkpoint for every later stage. sigmas:
    the few-step levels warped by the shift, host floats (Self Forcing: [1000, 750, 500, 250], shift 5)."""
    sigmas = [shift_sigma(float(s), cfg.shift) for s in cfg.timesteps.split(",")]
    return dict(chunk=cfg.chunk, sigmas=sigmas, n_sink=cfg.n_sink, n_window=cfg.n_window, window=window,
                shift=cfg.shift)


# ----------------------------------------------------------------------------- phase 1: ODE init

@torch.no_grad()
def ode_pairs(teacher, tck, n, *, sigmas, chunk, p_switch, device, gen):
    """Teacher Euler + CFG trajectories, kept at the student's levels (CausVid).
    -> xs (n,L,T,C,H,W) noisy states at the L levels, x0 (n,T,C,H,W), event (n,T) per frame."""
    tc, xs, x0s, evs, sig = tck["config"], [], [], [], torch.tensor(sigmas)
    grid = teacher_stage.euler_grid(tc["sample_steps"], tc["sample_shift"])
    grid = torch.cat([grid, sig]).unique().flip(0)               # an Euler grid that passes through every level
    for i in range(0, n, 64):
        b = min(64, n - i)
        event = random_events(b, tc["frames"], chunk, gen, p_switch)
        x = torch.randn(b, tc["frames"], 3, tc["size"], tc["size"], generator=gen).to(device)
        keep = []
        for a, c in zip(grid[:-1], grid[1:]):
            if torch.isclose(a, sig).any():
                keep.append(x)
            x = teacher_stage.sample(teacher, event.to(device), x, torch.stack([a, c]), tc["guidance"])
        xs.append(torch.stack(keep, 1).cpu())
        x0s.append(x.cpu())
        evs.append(event)
    return torch.cat(xs), torch.cat(x0s), torch.cat(evs)


def ode_loss(student, xs, x0, event, sigmas, chunk):
    """Each chunk at an independent random level (or clean), one block-causal forward.
    Eq. CausVid ODE regression: ||G(x_{sigma_k}) - x0||^2."""
    B, L, T = xs.shape[:3]
    k = torch.randint(L + 1, (B, T // chunk)).repeat_interleave(chunk, 1)   # (B,T); k == L means clean context
    sigma = torch.tensor(sigmas + [0.0])[k].to(xs.device, non_blocking=True)   # (B,T)
    x_in = torch.cat([xs, x0[:, None]], 1)[torch.arange(B)[:, None], k, torch.arange(T)]  # (B,T,C,H,W)
    v = student(x_in, sigma, event, causal_chunk=chunk)
    return ((pred_x0(x_in, v, sigma) - x0) ** 2).mean()         # CausVid, ODE regression


# ----------------------------------------------------------------------------- phase 2: DMD

def dmd_sigma(B, shift, device):
    """One level per clip: uniform, then shifted, then clamped to [0.02, 0.98] (Self Forcing)."""
    return shift_sigma(torch.rand(B, device=device), shift).clamp(0.02, 0.98)


def dmd_surrogate(x, grad):
    """DMD Eq. 7-8 as a loss, per frame: 0.5 (x - sg(x - grad))^2 averaged over the frame's pixels, whose
    gradient w.r.t. x is grad / (C H W) (in float64, as Self Forcing). x (B,T,...) with graph -> (B,T)."""
    target = (x.detach() - grad).double()
    return 0.5 * ((x.double() - target) ** 2).mean(dim=(2, 3, 4))


def dmd_loss(x, event, *, teacher, critic, guidance, shift):
    """Distribution matching distillation (DMD, Yin et al. 2024; Self Forcing sec. 3.3).
    x (B,T,...) generator samples with graph; event (B,T). Returns the per-frame loss (B,T),
    whose gradient w.r.t. x is proportional to grad = (fake - real) / mean|x - real|, and the steps: grad, and grad_null,
    the step the teacher without the event would give (Delta Forcing's DF (5')), and real (its DF (3L))."""
    B, T = x.shape[:2]
    sigma = dmd_sigma(B, shift, x.device)[:, None].expand(B, T)
    with torch.no_grad():                                        # scores are targets, never trained through
        xt = add_noise(x.detach(), torch.randn_like(x), sigma)
        v_c, v_u = cond_uncond(teacher, xt, sigma, event)
        real = pred_x0(xt, cfg_mix(v_c, v_u, guidance), sigma)   # DMD Eq. 7: the real score, the teacher with CFG
        fake = pred_x0(xt, critic(xt, sigma, event), sigma)      # DMD Eq. 7: the fake score, the critic
        norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)   # DMD Eq. 8: one normaliser per sample
        grad = torch.nan_to_num((fake - real) / norm)            # DMD Eq. 7-8: the KL gradient, normalised
        grad_null = torch.nan_to_num((fake - pred_x0(xt, v_u, sigma)) / norm)   # the same with the null event's real score
    return dmd_surrogate(x, grad), dict(grad=grad, grad_null=grad_null, real=real)


def critic_loss(critic, x, event, shift, frames=None):
    """The fake score learns the generator's current distribution by flow matching on detached
    samples, on the frames in the (T,) mask `frames` (None: all).
    DMD2's fake-score loss: ||v_fake(x_sigma) - (eps - x)||^2."""
    B, T = x.shape[:2]
    sigma = dmd_sigma(B, shift, x.device)[:, None].expand(B, T)
    eps = torch.randn_like(x)
    v = critic(add_noise(x, eps, sigma), sigma, event)
    per_frame = ((v.float() - (eps - x)) ** 2).mean(dim=(2, 3, 4))   # DMD2: fake score, flow matching
    return per_frame.mean() if frames is None else per_frame[:, frames].mean()


def critic_update(nets, x, event, *, shift, grad_clip, n_ranks=1, frames=None):
    """One fake-score step on detached generator samples (distill.py and longtune.py)."""
    with autocast(x.device):
        loss = critic_loss(nets.critic, x, event, shift, frames)
    optimizer_step(nets.critic, nets.opt_critic, loss, grad_clip, n_ranks)
    return loss


def random_exit_step(sigmas):
    """Self Forcing sec. 3.2: one exit step per rollout, shared by all its chunks, the only one with a graph."""
    return int(torch.randint(len(sigmas), ()))


@dataclass
class DMDNets:
    """The networks of DMD: the frozen teacher (the real score), the student and its EMA, the critic
    (the fake score), and the two optimisers."""
    teacher: torch.nn.Module
    student: torch.nn.Module
    ema: torch.nn.Module
    critic: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_critic: torch.optim.Optimizer


def dmd_nets(model_args, *, teacher, student, critic, cfg, device, compiled):
    """DMDNets from the given weights (None: fresh ones), AdamW with betas (0, 0.999) as Self
    Forcing, compiled in place if asked."""
    teacher = build(model_args, teacher, device).requires_grad_(False).eval()
    student, critic = build(model_args, student, device), build(model_args, critic, device)
    ema = ema_copy(student)
    for m in (student, critic, teacher):
        compile_(m, compiled)
    opt = adamw(student.parameters(), lr=cfg.lr, betas=(0.0, 0.999), weight_decay=0.01)
    opt_critic = adamw(critic.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    return DMDNets(teacher, student, ema, critic, opt, opt_critic)


def dmd_update(nets, cfg, *, sigmas, shape, gen, n_ranks=1):
    """One Self Forcing DMD iteration: cfg.critic_ratio critic updates, each on a fresh detached
    rollout, then one generator update through a rollout that keeps its exit step's graph.
    Every rollout draws its own per-stream schedule (gen). shape = (B, T, S).
    Returns (loss, critic loss, gnorm, applied)."""
    (B, T, S), device = shape, next(nets.student.parameters()).device

    def fresh_rollout():
        event = random_events(B, T, cfg.chunk, gen, cfg.p_switch).to(device, non_blocking=True)
        x = rollout(nets.student, torch.randn(B, T, 3, S, S, device=device), event, sigmas, cfg.chunk,
                    KVCache(cfg.n_sink, cfg.n_window), exit_step=random_exit_step(sigmas), switch=cfg.switch_cache)
        return x, event

    for _ in range(cfg.critic_ratio):                            # DMD2: 5 critic updates per generator update
        with torch.no_grad(), autocast(device):                  # samples are data for the critic, not a graph
            x, event = fresh_rollout()
        closs = critic_update(nets, x.float(), event, shift=cfg.shift, grad_clip=cfg.grad_clip, n_ranks=n_ranks)
    with autocast(device):                                       # the generator: Self Forcing rollout + DMD
        x, event = fresh_rollout()
        per_frame, _ = dmd_loss(x.float(), event, teacher=nets.teacher, critic=nets.critic, guidance=cfg.guidance,
                                shift=cfg.shift)
        loss = per_frame.mean()
    gnorm, applied = optimizer_step(nets.student, nets.opt, loss, cfg.grad_clip, n_ranks)
    return loss, closs, gnorm, applied


@torch.no_grad()
def evaluate(model, stream, tck, n, device, seed=1234):
    """Stream the teacher's evaluation clips (n one-event, n switch clips of the teacher's length)
    and score them as the teacher is scored. All draws come from its own generators, so an
    evaluation in the middle of training never moves the training stream's RNG."""
    tc, ch = tck["config"], stream["chunk"]
    one, sw = eval_events(n, tc["frames"], ch)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(2 * n, tc["frames"], 3, tc["size"], tc["size"], generator=gen)
    with autocast(device):
        x = rollout(model, noise.to(device), torch.cat([one, sw]).to(device), stream["sigmas"], ch,
                    KVCache(stream["n_sink"], stream["n_window"]), gen=gen).float().cpu()
    return clip_scores(x, one, sw, World(**tck["world"]), first=ch, chunk=ch), x[:n], x[n:]


def ensure_teacher(cfg, n_ranks=1):
    """Every check of distill's inputs, before any work; trains the teacher first if it is missing.
    -> (the teacher's checkpoint, its path)."""
    if cfg.n_window < cfg.chunk:
        raise BadInput(f"--n_window={cfg.n_window} must hold at least one chunk of {cfg.chunk} frames")
    path = cfg.teacher or os.path.join(cfg.out_dir, "teacher.pt")
    if not os.path.exists(path) and not cfg.teacher:
        tcfg = teacher_stage.TeacherConfig(**teacher_stage.PRESETS[cfg.preset])
        if tcfg.frames % cfg.chunk:
            raise BadInput(f"teacher clips of {tcfg.frames} frames do not split into chunks of {cfg.chunk}")
        if n_ranks > 1:
            raise BadInput(f"{path} is missing; train it first with `torchrun --nproc_per_node={n_ranks} teacher.py "
                           f"--preset={cfg.preset} --out_dir={cfg.out_dir}`")
        print(f"{path} is missing: training the teacher first (python teacher.py --preset={cfg.preset})")
        for f in dataclasses.fields(RunConfig):                  # every shared flag: a smoke run, a smoke teacher
            setattr(tcfg, f.name, getattr(cfg, f.name))
        teacher_stage.main(tcfg)
    ck = load_checkpoint(path, ["teacher"], f"python teacher.py --preset={cfg.preset}")
    if ck["step"] < ck["total"]:
        raise BadInput(f"{path} is unfinished (step {ck['step']} of {ck['total']}); "
                       f"finish it with `python teacher.py --resume=True`")
    if ck["config"]["frames"] % cfg.chunk:
        raise BadInput(f"teacher clips of {ck['config']['frames']} frames do not split into chunks of {cfg.chunk}")
    return ck, path


def main(cfg):
    run = init_run(cfg, cfg.batch)
    tck, teacher_path = ensure_teacher(cfg, run.n_ranks)
    tc, device = tck["config"], run.device
    stream = stream_args(cfg, tc["frames"])
    path = os.path.join(cfg.out_dir, "student.pt")
    nets = dmd_nets(tck["model_args"], teacher=tck["ema"], student=tck["ema"], critic=tck["ema"], cfg=cfg,
                    device=device, compiled=cfg.compile and device.type == "cuda")   # student and critic start as the teacher
    student, ema = nets.student, nets.ema
    gen = torch.Generator().manual_seed(cfg.seed)                # schedules and ODE pairs: --seed moves every draw
    objs = dict(model=student, ema=ema, critic=nets.critic, optimizer=nets.opt, critic_optimizer=nets.opt_critic)
    ck = resume(cfg, path, "student", "python distill.py", gen, **objs)
    phase, step, skipped = (ck["phase"], ck["step"], ck["skipped"]) if ck else ("ode", 0, 0)
    seed_rank(run, cfg.seed, step, gen)
    n_eval = capped(cfg.eval_samples, cfg, floor=4)
    save = checkpointer(path, run, gen, dict(stage="student", model_args=tck["model_args"], world=tck["world"],
                                             natural_step=tck["natural_step"], stream=stream, config=asdict(cfg),
                                             teacher=teacher_path), **objs)

    t_start = time.time()
    if phase == "ode":                                            # ---- phase 1: ODE init (CausVid)
        with autocast(device):                                    # each rank makes its share of the pairs
            xs, x0, event = ode_pairs(nets.teacher, tck, capped(cfg.ode_pairs, cfg, 8) // run.n_ranks,
                                      sigmas=stream["sigmas"], chunk=cfg.chunk, p_switch=cfg.p_switch, device=device,
                                      gen=gen)
        if run.rank == 0:
            print(f"ode init: {len(x0)} teacher trajectories per rank at levels {[round(v, 3) for v in stream['sigmas']]}"
                  f" ({time.time() - t_start:.0f}s)")
        opt_ode = adamw(student.parameters(), lr=cfg.ode_lr, weight_decay=0.01)
        for i in tqdm(range(capped(cfg.ode_steps, cfg)), desc="ode init", mininterval=5, disable=run.rank > 0):
            idx = torch.randint(len(x0), (run.batch,), generator=gen)
            with autocast(device):
                loss = ode_loss(student, *(a[idx].to(device, non_blocking=True) for a in (xs, x0, event)),
                                stream["sigmas"], cfg.chunk)
            skipped += not optimizer_step(student, opt_ode, loss, 1.0, run.n_ranks)[1]
            if (i + 1) % (cfg.log_every * 10) == 0 and run.rank == 0:
                tqdm.write(f"ode {i + 1} | loss {loss.item():.4f}")
        ema.load_state_dict(student.state_dict())
        phase, step = "dmd", 0
        save(phase=phase, step=0, skipped=skipped, metrics={})
        if run.rank == 0:
            m, _, _ = evaluate(ema, stream, tck, min(32, n_eval), device)
            print("after ode init: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))

    n_updates = capped(cfg.dmd_steps, cfg)
    t0 = time.time()
    for step in tqdm(range(step, n_updates), initial=step, total=n_updates, desc="dmd", mininterval=5,
                     disable=run.rank > 0):
        loss, closs, gnorm, applied = dmd_update(nets, cfg, sigmas=stream["sigmas"], gen=gen,
                                                 shape=(run.batch, tc["frames"], tc["size"]), n_ranks=run.n_ranks)
        skipped += not applied
        ema_update(ema, student, cfg.ema_decay if step >= cfg.ema_start else 0.0)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_updates:
            dt = (time.time() - t0) / cfg.log_every
            if run.rank == 0:
                tqdm.write(f"dmd {step + 1} | dmd loss {loss.item():.4f} | critic loss {closs.item():.4f} | "
                           f"gnorm {gnorm:.3f} | {dt:.2f} s/update | skipped {skipped}")
            t0 = time.time()
            save(phase=phase, step=step + 1, skipped=skipped, metrics={})   # holds the next update to run
    check_in_sync(student, run)
    if run.rank > 0:
        return
    metrics, one, sw = evaluate(ema, stream, tck, n_eval, device)
    raw, _, _ = evaluate(student, stream, tck, n_eval, device)
    metrics.update({f"raw_{k}": v for k, v in raw.items()}, train_minutes=(time.time() - t_start) / 60)
    for name, m in (("student (EMA)", metrics), ("student (raw)", raw), ("teacher", tck["metrics"])):
        print(f"{name}: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items() if not k.startswith("raw_")))
    save(phase=phase, step=n_updates, skipped=skipped, metrics=metrics)
    save_video(os.path.join(cfg.out_dir, "student_samples.gif"), torch.cat(list(one[:5]) + list(sw[:5]), -1))
    k = min(5, n_eval)
    _, t_one, t_sw = teacher_stage.evaluate(nets.teacher, teacher_stage.TeacherConfig(**tck["config"]), k, device)
    pairs = torch.stack([torch.cat([t_one, t_sw]), torch.cat([one[:k], sw[:k]])], 1).flatten(0, 1)   # teacher, student, ...
    save_strip(os.path.join(cfg.out_dir, "teacher_vs_student.png"), pairs)
    print(f"wrote {path}, {cfg.out_dir}/student_samples.gif and {cfg.out_dir}/teacher_vs_student.png")


if __name__ == "__main__":
    cli(main, DistillConfig, PRESETS)
