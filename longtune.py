"""Streaming long tuning with event switches (LongLive), the baseline that Delta Forcing improves on
(DESIGN section 7). With --trust_region=True the window loss becomes Delta Forcing's (section 8).

The student rolls out long videos (default 8 teacher windows) chunk by chunk through its KV
cache, with sink and rolling window; the rollout state persists across optimiser steps. Events
switch at random chunk boundaries, at least once per video, and the cache is refreshed under the
new event (--switch_cache). Each step supervises the newest teacher-length window, K detached
context frames plus F new frames, with the DMD loss of distill.py, the teacher and critic both
conditioned on the window's current event, and the loss masked to the new frames.

    python longtune.py                      # writes out/longtune.pt
    python longtune.py --switch_cache=keep --out_name=longtune_keep.pt
    torchrun --nproc_per_node=8 longtune.py --trust_region=True   # data parallel
"""
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import distill
import teacher as teacher_stage
import trust_region
from model import (BadInput, KVCache, build, check_in_sync, check_writable, cli, ema_update, load_checkpoint,
                   maybe_compile, per_rank, pick_device, rollout, save_checkpoint, setup_distributed)
from world import EVENTS


@dataclass
class LongtuneConfig:
    preset: str = "tiny"
    out_dir: str = "out"
    out_name: str = ""             # default longtune.pt (deltaforcing.pt with --trust_region=True)
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    compile: bool = True           # used on CUDA only; CPU stays eager
    max_steps: int = 0             # if > 0, caps the generator updates (smoke runs and tests)
    student: str = ""              # default out_dir/student.pt
    windows: int = 8               # rollout length, in teacher windows
    context: int = 2               # K detached context frames in each supervised window
    switch_cache: str = "recache"  # recache | keep | clear, at every event switch
    max_switches: int = 3
    steps: int = 150               # generator updates
    critic_ratio: int = 5
    batch: int = 8
    lr: float = 5e-5               # as distill.py (LongLive tunes at a higher rate than its distillation)
    critic_lr: float = 1e-4
    guidance: float = 1.0
    grad_clip: float = 10.0
    ema: float = 0.99
    ema_start: int = 20
    log_every: int = 10
    trust_region: bool = False     # Delta Forcing (trust_region.py): writes deltaforcing.pt
    tr_weights: bool = True        # ablation: the trust weights w_f
    tr_continuity: bool = True     # ablation: the monotonic continuity objective
    tau: float = 0.5               # trust radius, in natural steps (a teleport's excess is about 1)
    mc_radius: float = 1.0         # continuity bound per frame, in natural steps
    lam: float = 1.0               # weight of the continuity objective
    step_floor: float = 0.5        # floor of the natural step m


PRESETS = {"tiny": {}, "small": dict(steps=500, batch=16)}


def random_schedule(B, L, chunk, first, max_switches, gen):
    """Per-frame events (B,L): every video switches 1..max_switches times, at chunk boundaries
    shared by the batch (so the batched cache switches together), never before frame `first`.
    Each video draws its own events, and a switch always changes the event."""
    bounds = torch.arange(first, L, chunk)
    n = int(torch.randint(1, max_switches + 1, (), generator=gen))
    at = bounds[torch.randperm(len(bounds), generator=gen)[:n]].sort().values
    ev = torch.empty(B, L, dtype=torch.long)
    cur = torch.randint(len(EVENTS), (B,), generator=gen)
    start = 0
    for a in at.tolist() + [L]:
        ev[:, start:a] = cur[:, None]
        cur = (cur + torch.randint(1, len(EVENTS), (B,), generator=gen)) % len(EVENTS)
        start = a
    return ev


class Streams:
    """B long videos in progress. Their cache, schedule, position and last committed frames
    persist across optimiser steps, as LongLive's rollout state does."""

    def __init__(self, cfg, tcfg, gen, device, batch=None):
        self.cfg, self.tcfg, self.gen, self.device = cfg, tcfg, gen, device
        self.batch = batch or cfg.batch                          # this rank's share of the streams
        W, F = tcfg["frames"], tcfg["frames"] - cfg.context
        self.L = W + math.ceil((cfg.windows - 1) * W / F) * F       # at least `windows` teacher windows long
        self.reset()

    def reset(self):
        cfg, tcfg = self.cfg, self.tcfg
        self.cache = KVCache(cfg.n_sink, cfg.n_window)
        self.events = random_schedule(self.batch, self.L, cfg.chunk, tcfg["frames"], cfg.max_switches, self.gen).to(self.device)
        self.t, self.context = 0, None

    def advance(self, model, levels, exit_step):
        """Generate the next frames: a whole teacher window at the start of a video, then F new
        frames. Returns the supervised window (B,W,...), its event (B,) and its new-frame mask (W,)."""
        W, K = self.tcfg["frames"], self.cfg.context
        n = W if self.t == 0 else W - K
        S = self.tcfg["size"]
        noise = torch.randn(self.batch, n, 3, S, S, device=self.device)
        ev = self.events[:, self.t:self.t + n]
        new = rollout(model, noise, ev, levels, self.cfg.chunk, self.cache, exit_step, self.cfg.switch_cache)
        window = new if self.context is None else torch.cat([self.context, new], 1)   # (B,W,C,H,W)
        mask = torch.arange(W, device=self.device) >= W - n
        switched = bool((self.events[:, max(0, self.t - K):self.t + n] != ev[:, -1:]).any())
        self.context = new[:, -K:].detach()                      # committed history: context, never a graph
        self.t += n
        if self.t >= self.L:
            self.reset()
        return window, ev[:, -1], mask, switched


def window_loss(per_frame, window, mask, aux, cfg):
    """The one place the supervised window's per-frame DMD loss becomes a scalar.
    Baseline (LongLive): the mean over the new frames only. Delta Forcing: trust_region.py."""
    if cfg.trust_region:
        return trust_region.delta_forcing_loss(per_frame, window, aux, int((~mask).sum()), cfg.tau, cfg.lam,
                                               cfg.step_floor, cfg.tr_weights, cfg.tr_continuity, cfg.mc_radius)
    return per_frame[:, mask].mean(), {}                         # Eq. LongLive section 3.2: DMD masked to new frames


def tune_update(streams, nets, opts, cfg, levels, shift, amp, world=1):
    """One long-tuning iteration: advance the streams by F frames (graph at one shared exit step),
    one generator update on the newest window, then cfg.critic_ratio critic updates on it.
    nets = (student, critic, gen_fwd, critic_fwd, teacher_fwd); opts = (opt, opt_c). A skipped
    (non-finite) generator step still gives the critic its updates: the window is data either way.
    Returns (loss, critic loss, gnorm, applied, trust-region logs, whether the window holds a switch)."""
    student, critic, gen_fwd, critic_fwd, teacher_fwd = nets
    exit_step = int(torch.randint(len(levels), ()))              # one exit step, shared by the window's chunks
    with amp:
        window, event, mask, switched = streams.advance(gen_fwd, levels, exit_step)
        ev = event[:, None].expand(-1, window.shape[1])          # the current event for the whole window (LongLive)
        per_frame, aux = distill.dmd_loss(window.float(), ev, teacher_fwd, critic_fwd, cfg.guidance, shift)
        loss, logs = window_loss(per_frame, window, mask, aux, cfg)
    gnorm, applied = teacher_stage.optimizer_step(student, opts[0], loss, cfg.grad_clip, world)
    x = window.detach().float()                                  # the critic learns the generator's windows
    for _ in range(cfg.critic_ratio):                            # 5 critic updates per generator update (DMD2)
        closs = distill.critic_update(critic_fwd, critic, opts[1], x, ev, shift, cfg.grad_clip, amp, world)
    return loss, closs, gnorm, applied, logs, switched


def load_student(cfg):
    path = cfg.student or os.path.join(cfg.out_dir, "student.pt")
    ck = load_checkpoint(path, ["student"], f"python distill.py --preset={cfg.preset}")
    tcfg = ck["teacher_config"]
    W = tcfg["frames"]
    if not 0 < cfg.context < W or (W - cfg.context) % ck["config"]["chunk"]:
        raise BadInput(f"--context={cfg.context} must leave a whole number of {ck['config']['chunk']}-frame chunks "
                       f"in a {W}-frame teacher window")
    if cfg.switch_cache not in ("recache", "keep", "clear"):
        raise BadInput(f"--switch_cache must be recache, keep or clear, not {cfg.switch_cache!r}")
    return ck, tcfg


def main(cfg):
    rank, world, local = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, local)
    check_writable(cfg.out_dir)
    batch = per_rank(cfg.batch, world)
    sck, tcfg = load_student(cfg)
    scfg = distill.DistillConfig(**{k: v for k, v in sck["config"].items() if k in distill.DistillConfig.__dataclass_fields__})
    cfg.chunk, cfg.n_sink, cfg.n_window = scfg.chunk, scfg.n_sink, scfg.n_window   # the student's streaming setup
    name = cfg.out_name or ("deltaforcing.pt" if cfg.trust_region else "longtune.pt")
    path = os.path.join(cfg.out_dir, name)
    teacher = build(tcfg, device=device).requires_grad_(False).eval()
    tck = load_checkpoint(sck["teacher_path"], ["teacher"], f"python teacher.py --preset={cfg.preset}")
    teacher.load_state_dict(tck["ema"])
    student = build(sck, "ema", device)                           # start from the distilled student
    critic = build(sck, "critic", device)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.0, 0.999), weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    levels = distill.student_levels(scfg, device)
    step, skipped = 0, 0
    gen = torch.Generator().manual_seed(cfg.seed)                 # schedules: the same data for every run of a seed
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, ["longtune"], f"python longtune.py --out_name={name}")
        for mod, key in ((student, "model"), (ema, "ema"), (critic, "critic")):
            mod.load_state_dict(ck[key])
        opt.load_state_dict(ck["optimizer"]); opt_c.load_state_dict(ck["critic_optimizer"])
        step, skipped = ck["step"], ck.get("skipped", 0)
        torch.set_rng_state(ck["rng"]); gen.set_state(ck["gen"])
        print(f"resumed {path} at step {step} (the rollout state restarts with a new video)")
    if rank:                                                      # other ranks draw their own schedules and noise
        gen.manual_seed(cfg.seed + 1000 * rank + step); torch.manual_seed(cfg.seed + 1000 * rank + step)
    on = cfg.compile and device.type == "cuda"
    gen_fwd, critic_fwd, teacher_fwd = (maybe_compile(m, on) for m in (student, critic, teacher))
    amp = teacher_stage.autocast(device)
    streams = Streams(cfg, tcfg, gen, device, batch)
    n_updates = min(cfg.steps, cfg.max_steps) if cfg.max_steps > 0 else cfg.steps
    if rank == 0:
        print(f"long tuning {name}: {streams.L}-frame rollouts ({cfg.windows} teacher windows), windows of "
              f"{cfg.context} context + {tcfg['frames'] - cfg.context} new frames, switch cache: {cfg.switch_cache}")

    def checkpoint():
        if rank == 0:                                             # one writer; every rank holds the same weights
            save_checkpoint(path, dict(
                stage="longtune", model=student.state_dict(), ema=ema.state_dict(), critic=critic.state_dict(),
                optimizer=opt.state_dict(), critic_optimizer=opt_c.state_dict(), config={**sck["config"], **asdict(cfg)},
                teacher_config=tcfg, teacher_path=sck["teacher_path"], step=step, skipped=skipped, metrics={},
                rng=torch.get_rng_state(), gen=gen.get_state()))

    t0, seen = time.time(), {"switch": [], "plain": []}          # trust-region logs, split by window kind
    nets = (student, critic, gen_fwd, critic_fwd, teacher_fwd)
    for step in tqdm(range(step, n_updates), initial=step, total=n_updates, desc="longtune", mininterval=5,
                     disable=rank > 0):
        loss, closs, gnorm, applied, logs, switched = tune_update(streams, nets, (opt, opt_c), cfg, levels, scfg.shift,
                                                                  amp, world)
        if not applied:                                           # a non-finite step is skipped and counted
            skipped += 1
            continue
        ema_update(ema, student, cfg.ema if step >= cfg.ema_start else 0.0)
        if logs:
            seen["switch" if switched else "plain"].append(logs)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_updates:
            dt = (time.time() - t0) / cfg.log_every
            extra = "".join(f" | {kind} " + " ".join(f"{k} {sum(d[k] for d in v) / len(v):.3f}" for k in v[0])
                            for kind, v in seen.items() if v)
            seen = {"switch": [], "plain": []}
            if rank == 0:
                tqdm.write(f"longtune {step + 1} | dmd loss {loss.item():.4f} | critic loss {closs.item():.4f} | "
                           f"gnorm {gnorm:.3f}{extra} | {dt:.2f} s/update | skipped {skipped}")
            t0 = time.time()
            step += 1
            checkpoint()
            step -= 1
    step = n_updates
    check_in_sync(student, rank, world)
    checkpoint()
    if rank == 0:
        print(f"wrote {path}; evaluate it with `python sample.py --eval --ckpts={path}`")


if __name__ == "__main__":
    cli(main, LongtuneConfig, PRESETS)
