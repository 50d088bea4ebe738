"""Distil the bidirectional teacher into a causal, 4-step, streaming generator (DESIGN section 6).

Phase 1, ODE init (CausVid): regress the causal student onto teacher Euler trajectories.
Phase 2, Self Forcing DMD: roll the student out through its KV cache exactly as at inference,
and push its samples toward the teacher's distribution with distribution matching distillation.

    python distill.py                       # the main job: trains the teacher first if it is missing
    python distill.py --preset=tiny --dmd_steps=100 --resume=True
    torchrun --nproc_per_node=8 distill.py  # data parallel (the teacher must exist: torchrun teacher.py first)
"""
import copy
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import teacher as teacher_stage
from model import (BadInput, KVCache, add_noise, build, cfg_mix, check_in_sync, check_writable, cli, ema_update,
                   load_checkpoint, maybe_compile, per_rank, pick_device, pred_x0, rollout, save_checkpoint,
                   setup_distributed, shift_sigma)
from world import EVENTS, World, batch_metrics, save_strip, save_video, summarize


@dataclass
class DistillConfig:
    preset: str = "tiny"
    out_dir: str = "out"
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    compile: bool = True           # used on CUDA only; CPU stays eager
    max_steps: int = 0             # if > 0, caps the DMD generator updates (smoke runs and tests)
    teacher: str = ""              # teacher checkpoint; default out_dir/teacher.pt, trained first if missing
    # the student
    chunk: int = 2                 # frames per autoregressive chunk
    levels: str = "1,0.75,0.5,0.25"  # denoising levels before the shift (Self Forcing's 4 steps)
    shift: float = 3.0             # time shift of the levels and of the DMD sigma draw
    n_sink: int = 2
    n_window: int = 8
    # phase 1: ODE init
    ode_pairs: int = 512           # teacher trajectories
    ode_steps: int = 600
    ode_lr: float = 3e-4
    # phase 2: DMD
    dmd_steps: int = 150           # generator updates; each is followed by critic_ratio critic updates
    critic_ratio: int = 5
    batch: int = 16
    lr: float = 5e-5
    critic_lr: float = 1e-4
    guidance: float = 1.0          # g of the real score: cond + g (cond - uncond)
    grad_clip: float = 10.0
    ema: float = 0.99
    ema_start: int = 20
    eval_samples: int = 64
    log_every: int = 10


PRESETS = {"tiny": {}, "small": dict(ode_pairs=2048, ode_steps=2000, dmd_steps=600, batch=32, chunk=3, n_sink=3, n_window=12)}


def student_levels(cfg, device="cpu"):
    return shift_sigma(torch.tensor([float(s) for s in cfg.levels.split(",")], device=device), cfg.shift)


# ----------------------------------------------------------------------------- phase 1: ODE init

@torch.no_grad()
def ode_pairs(teacher, tcfg, n, levels, device, gen):
    """Teacher Euler + CFG trajectories, kept at the student's levels (CausVid). -> xs (n,K,T,...), x0, event."""
    xs, x0s, evs = [], [], []
    for i in range(0, n, 64):
        b = min(64, n - i)
        event = torch.randint(len(EVENTS), (b,), generator=gen)
        x = torch.randn(b, tcfg["frames"], 3, tcfg["size"], tcfg["size"], generator=gen).to(device)
        grid = teacher_stage.euler_grid(tcfg["sample_steps"], tcfg["sample_shift"])
        grid = torch.cat([grid, levels.cpu()]).unique().flip(0)   # an Euler grid that passes through every level
        keep = []
        for a, c in zip(grid[:-1], grid[1:]):
            if torch.isclose(a, levels.cpu()).any():
                keep.append(x)
            x = teacher_stage.sample(teacher, event.to(device), x, torch.stack([a, c]), tcfg["guidance"])
        xs.append(torch.stack(keep, 1).cpu()); x0s.append(x.cpu()); evs.append(event)
    return torch.cat(xs), torch.cat(x0s), torch.cat(evs)


def ode_loss(student, xs, x0, event, levels, chunk):
    """Each chunk at an independent random level (or clean), one block-causal forward.
    Eq. CausVid ODE regression: ||G(x_{sigma_k}) - x0||^2."""
    B, K, T = xs.shape[:3]
    k = torch.randint(K + 1, (B, T // chunk)).repeat_interleave(chunk, 1)   # (B,T); k == K means clean context
    lv = torch.cat([levels, levels.new_zeros(1)])
    sigma = lv[k]                                                # (B,T)
    x_in = torch.cat([xs, x0[:, None]], 1)[torch.arange(B)[:, None], k, torch.arange(T)]  # (B,T,C,H,W)
    v = student(x_in, sigma, event[:, None].expand(B, T), causal_chunk=chunk)
    return ((pred_x0(x_in, v, sigma) - x0) ** 2).mean()         # Eq. CausVid (Yin et al. 2025) ODE loss


# ----------------------------------------------------------------------------- phase 2: DMD

def dmd_sigma(B, shift, device):
    """One level per clip: uniform, then shifted, then clamped (Self Forcing)."""
    return shift_sigma(torch.rand(B, device=device), shift).clamp(0.02, 0.98)


def dmd_loss(x, event, teacher, critic, guidance, shift):
    """Distribution matching distillation (DMD, Yin et al. 2024; Self Forcing section 3.3).
    x (B,T,...) generator samples with graph; event (B,T). Returns the per-frame loss (B,T),
    whose gradient w.r.t. x is (fake - real) / mean|x - real|, and the predictions it used."""
    B, T = x.shape[:2]
    sigma = dmd_sigma(B, shift, x.device)[:, None].expand(B, T)
    with torch.no_grad():                                        # scores are targets, never trained through
        xt = add_noise(x.detach(), torch.randn_like(x), sigma)
        null = torch.full_like(event, teacher.null_event)
        v_c, v_u = teacher(xt.repeat(2, 1, 1, 1, 1), sigma.repeat(2, 1), torch.cat([event, null])).chunk(2)
        real = pred_x0(xt, cfg_mix(v_c, v_u, guidance), sigma)  # Eq. DMD real score: teacher with CFG
        fake = pred_x0(xt, critic(xt, sigma, event), sigma)      # Eq. DMD fake score: the critic, no CFG
        norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)   # one normalizer per sample
        grad = torch.nan_to_num((fake - real) / norm)            # Eq. DMD (7): grad of KL ~ fake - real
    target = (x.detach() - grad).double()
    per_frame = 0.5 * ((x.double() - target) ** 2).mean(dim=(2, 3, 4))           # Eq. DMD2: 0.5||x - sg(x - grad)||^2
    return per_frame, dict(sigma=sigma, real=real, fake=fake, grad=grad)


def critic_loss(critic, x, event, shift):
    """The fake score learns the generator's current distribution by flow matching on detached samples.
    Eq. DMD2 (Yin et al. 2024) fake-score loss: ||v_fake(x_sigma) - (eps - x)||^2."""
    B, T = x.shape[:2]
    sigma = dmd_sigma(B, shift, x.device)[:, None].expand(B, T)
    eps = torch.randn_like(x)
    v = critic(add_noise(x, eps, sigma), sigma, event)
    return ((v.float() - (eps - x)) ** 2).mean()                 # Eq. DMD2 critic flow-matching loss


def critic_update(critic_fwd, critic, opt_c, x, event, shift, grad_clip, amp, world=1):
    """One fake-score step on detached generator samples; distill.py and longtune.py both run 5
    of these per generator update (DMD2's two time scales)."""
    with amp:
        loss = critic_loss(critic_fwd, x, event, shift)
    teacher_stage.optimizer_step(critic, opt_c, loss, grad_clip, world)
    return loss


def dmd_update(nets, opts, cfg, levels, shape, amp, world=1):
    """One Self Forcing DMD iteration: cfg.critic_ratio critic updates, each on a fresh detached
    rollout, then one generator update through a rollout that keeps its exit step's graph.
    nets = (student, critic, gen_fwd, critic_fwd, teacher_fwd), the last three maybe compiled;
    opts = (opt, opt_c); shape = (B, T, S). Returns (loss, critic loss, gnorm, applied)."""
    student, critic, gen_fwd, critic_fwd, teacher_fwd = nets
    (B, T, S), K, device = shape, len(levels), levels.device
    for _ in range(cfg.critic_ratio):                            # critic: 5 updates per generator update (DMD2)
        event = torch.randint(len(EVENTS), (B, 1), device=device).expand(-1, T)
        with torch.no_grad(), amp:                               # samples are data for the critic, not a graph
            x = rollout(gen_fwd, torch.randn(B, T, 3, S, S, device=device), event, levels, cfg.chunk,
                        KVCache(cfg.n_sink, cfg.n_window), exit_step=int(torch.randint(K, ())))
        closs = critic_update(critic_fwd, critic, opts[1], x.float(), event, cfg.shift, cfg.grad_clip, amp, world)
    event = torch.randint(len(EVENTS), (B, 1), device=device).expand(-1, T)
    with amp:                                                    # generator: Self Forcing rollout + DMD
        x = rollout(gen_fwd, torch.randn(B, T, 3, S, S, device=device), event, levels, cfg.chunk,
                    KVCache(cfg.n_sink, cfg.n_window), exit_step=int(torch.randint(K, ())))
        per_frame, _ = dmd_loss(x.float(), event, teacher_fwd, critic_fwd, cfg.guidance, cfg.shift)
        loss = per_frame.mean()
    gnorm, applied = teacher_stage.optimizer_step(student, opts[0], loss, cfg.grad_clip, world)
    return loss, closs, gnorm, applied


@torch.no_grad()
def evaluate(model, cfg, tcfg, n, device, seed=1234):
    """Stream n teacher-length clips (one event each, events cycling) and score them as the teacher is scored."""
    gen = torch.Generator().manual_seed(seed)
    event = (torch.arange(n) % len(EVENTS))[:, None].expand(n, tcfg["frames"])
    noise = torch.randn(n, tcfg["frames"], 3, tcfg["size"], tcfg["size"], generator=gen)
    torch.manual_seed(seed)                                      # the re-noising draws
    x = rollout(model, noise.to(device), event.to(device), student_levels(cfg, device), cfg.chunk,
                KVCache(cfg.n_sink, cfg.n_window)).float().cpu()
    return summarize(batch_metrics(x, event, world_of(tcfg), first=1)), x


def world_of(tcfg):
    return World(**{k: tcfg[k] for k in ("size", "sprite", "speed", "rho")})


def load_teacher(cfg, device, world=1):
    path = cfg.teacher or os.path.join(cfg.out_dir, "teacher.pt")
    if not os.path.exists(path) and not cfg.teacher and world > 1:
        raise BadInput(f"{path} is missing; train it first with `torchrun --nproc_per_node={world} teacher.py "
                       f"--preset={cfg.preset} --out_dir={cfg.out_dir}`")
    if not os.path.exists(path) and not cfg.teacher:
        print(f"{path} is missing: training the teacher first (python teacher.py --preset={cfg.preset})")
        tcfg = teacher_stage.TeacherConfig(**teacher_stage.PRESETS[cfg.preset])
        tcfg.preset, tcfg.out_dir, tcfg.device, tcfg.seed = cfg.preset, cfg.out_dir, cfg.device, cfg.seed
        teacher_stage.main(tcfg)
    ck = load_checkpoint(path, ["teacher"], f"python teacher.py --preset={cfg.preset}")
    if ck["step"] < ck["config"]["max_steps"]:
        raise BadInput(f"{path} is unfinished (step {ck['step']} of {ck['config']['max_steps']}); "
                       f"finish it with `python teacher.py --resume=True`")
    if cfg.n_window < cfg.chunk:
        raise BadInput(f"--n_window={cfg.n_window} must hold at least one chunk of {cfg.chunk} frames")
    if ck["config"]["frames"] % cfg.chunk:
        raise BadInput(f"teacher clips of {ck['config']['frames']} frames do not split into chunks of {cfg.chunk}")
    return ck, path


def main(cfg):
    rank, world, local = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, local)
    check_writable(cfg.out_dir)
    batch = per_rank(cfg.batch, world)
    tck, teacher_path = load_teacher(cfg, device, world)
    tcfg = tck["config"]
    teacher = build(tck, "ema", device).requires_grad_(False).eval()
    path = os.path.join(cfg.out_dir, "student.pt")
    student = build(tck, "ema", device)                           # the student starts from the teacher's weights
    critic = build(tck, "ema", device)                            # and so does the fake score
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.0, 0.999), weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    levels = student_levels(cfg, device)
    phase, step, skipped = "ode", 0, 0
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, ["student"], "python distill.py")
        for mod, key in ((student, "model"), (ema, "ema"), (critic, "critic")):
            mod.load_state_dict(ck[key])
        opt.load_state_dict(ck["optimizer"]); opt_c.load_state_dict(ck["critic_optimizer"])
        phase, step, skipped = ck["phase"], ck["step"], ck.get("skipped", 0)
        torch.set_rng_state(ck["rng"])
        print(f"resumed {path}: phase {phase}, step {step}")
    if rank:                                                      # other ranks draw their own data and noise
        torch.manual_seed(cfg.seed + 1000 * rank + step)
    on = cfg.compile and device.type == "cuda"
    gen_fwd, critic_fwd, teacher_fwd = (maybe_compile(m, on) for m in (student, critic, teacher))
    amp = teacher_stage.autocast(device)

    def checkpoint(metrics=None):
        if rank == 0:                                             # one writer; every rank holds the same weights
            save_checkpoint(path, dict(
                stage="student", model=student.state_dict(), ema=ema.state_dict(), critic=critic.state_dict(),
                optimizer=opt.state_dict(), critic_optimizer=opt_c.state_dict(), config={**tcfg, **asdict(cfg)},
                teacher_config=tcfg, teacher_path=teacher_path, phase=phase, step=step, skipped=skipped,
                metrics=metrics or {}, rng=torch.get_rng_state()))

    t_start = time.time()
    if phase == "ode":                                            # ---- phase 1: ODE init (CausVid)
        gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
        with amp:                                                 # each rank makes its share of the pairs
            xs, x0, event = ode_pairs(teacher, tcfg, cfg.ode_pairs // world, levels, device, gen)
        if rank == 0:
            print(f"ode init: {len(x0)} teacher trajectories per rank at levels {[round(v, 3) for v in levels.tolist()]}"
                  f" ({time.time() - t_start:.0f}s)")
        opt_ode = torch.optim.AdamW(student.parameters(), lr=cfg.ode_lr, weight_decay=0.01)
        for i in tqdm(range(cfg.ode_steps), desc="ode init", mininterval=5, disable=rank > 0):
            idx = torch.randint(len(x0), (batch,), generator=gen)
            with amp:
                loss = ode_loss(gen_fwd, xs[idx].to(device), x0[idx].to(device), event[idx].to(device), levels, cfg.chunk)
            skipped += not teacher_stage.optimizer_step(student, opt_ode, loss, 1.0, world)[1]
            if (i + 1) % (cfg.log_every * 10) == 0 and rank == 0:
                tqdm.write(f"ode {i + 1} | loss {loss.item():.4f}")
        ema.load_state_dict(student.state_dict())
        phase, step = "dmd", 0
        checkpoint()
        if rank == 0:
            m, _ = evaluate(ema, cfg, tcfg, 32, device)
            print("after ode init: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))

    n_updates = min(cfg.dmd_steps, cfg.max_steps) if cfg.max_steps > 0 else cfg.dmd_steps
    nets, shape = (student, critic, gen_fwd, critic_fwd, teacher_fwd), (batch, tcfg["frames"], tcfg["size"])
    t0 = time.time()
    for step in tqdm(range(step, n_updates), initial=step, total=n_updates, desc="dmd", mininterval=5, disable=rank > 0):
        loss, closs, gnorm, applied = dmd_update(nets, (opt, opt_c), cfg, levels, shape, amp, world)
        if not applied:                                           # a non-finite step is skipped and counted
            skipped += 1
            continue
        ema_update(ema, student, cfg.ema if step >= cfg.ema_start else 0.0)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_updates:
            dt = (time.time() - t0) / cfg.log_every               # .item() syncs once per log line only
            if rank == 0:
                tqdm.write(f"dmd {step + 1} | dmd loss {loss.item():.4f} | critic loss {closs.item():.4f} | "
                           f"gnorm {gnorm:.3f} | {dt:.2f} s/update | skipped {skipped}")
            t0 = time.time()
            step += 1                                             # the checkpoint holds the next update to run
            checkpoint()
            step -= 1
    step = n_updates
    check_in_sync(student, rank, world)
    if rank > 0:
        return
    metrics, samples = evaluate(ema, cfg, tcfg, cfg.eval_samples, device)
    metrics["train_minutes"] = (time.time() - t_start) / 60
    print("student samples: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    print("teacher samples: " + " | ".join(f"{k} {v:.3f}" for k, v in tck["metrics"].items()))
    checkpoint(metrics)
    save_video(os.path.join(cfg.out_dir, "student_samples.gif"), torch.cat(list(samples[:10]), -1))
    n = min(len(EVENTS), len(samples))
    _, t_samples = teacher_stage.evaluate(teacher, teacher_stage.TeacherConfig(**tcfg), n, device)
    pairs = torch.stack([t_samples, samples[:n]], 1).flatten(0, 1)   # teacher, student, ... per event
    save_strip(os.path.join(cfg.out_dir, "teacher_vs_student.png"), pairs)
    print(f"wrote {path}, {cfg.out_dir}/student_samples.gif and {cfg.out_dir}/teacher_vs_student.png")


if __name__ == "__main__":
    cli(main, DistillConfig, PRESETS)
