"""Streaming long tuning with event switches (LongLive, Yang et al. 2025), the baseline that Delta
Forcing improves on; with --trust_region=True the window loss becomes Delta Forcing's.

The student rolls out long videos (default 8 teacher windows) chunk by chunk through its KV
cache, with sink and rolling window; the rollout state persists across optimiser steps. Each
video switches event 1..max_switches times at its own chunk boundaries, and at a switch that
stream's cache is recomputed under the new event, its sink keeping the old one (--switch_cache).
Each iteration advances every stream by F new frames and supervises the newest teacher-length
window, K detached context
frames plus the F new ones, with the DMD loss of distill.py, masked to the new frames. The
teacher and critic see each frame's own event, so no frame generated under one event is
supervised under another; --window_events=current gives the whole window the newest frame's
event instead, as LongLive gives its text teacher one prompt per window.

    python longtune.py                      # writes out/longtune.pt
    python longtune.py --trust_region=True  # Delta Forcing, writes out/deltaforcing.pt
    python longtune.py --switch_cache=keep --out_name=longtune_keep.pt
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import distill
import trust_region
from common import (autocast, check_in_sync, checkpointer, ema_update, init_run, load_checkpoint, optimizer_step,
                    resume, seed_rank)
from config import BadInput, BandLevels, Count, NonNegative, OneOf, Positive, Prob, RunConfig, SwitchCache, Whole, capped, cli
from model import KVCache, rollout
from world import batch_metrics, load_world, ordered_pairs, random_events, summarize


@dataclass
class LongtuneConfig(RunConfig):
    out_name: str = ""             # default longtune.pt (deltaforcing.pt with --trust_region=True)
    student: str = ""              # default out_dir/student.pt
    windows: Count = 8             # rollout length, in teacher windows
    context: Count = 2             # K detached context frames in each supervised window
    switch_cache: SwitchCache = "recache_window"  # at every switch, per stream: recache_window | recache | keep | clear
    window_events: OneOf("true", "current") = "true"   # true: each frame's own event | current: the newest frame's (LongLive)
    critic_frames: OneOf("window", "new") = "window"   # the critic learns the whole window | only its new frames (LongLive)
    # the whole window: level with LongLive's mask when measured (react 0.91 / 0.90, follow 0.71 / 0.73), more samples
    max_switches: Count = 3        # switches per long video: 1 .. max_switches
    steps: Count = 400             # generator updates
    critic_ratio: Count = 5        # critic updates per generator update, each on a freshly generated window
    batch: Count = 8               # streams (the global batch under torchrun)
    lr: Positive = 5e-5            # the generator's learning rate, as distill.py
    critic_lr: Positive = 1e-5     # a fifth, as LongLive (1e-5 / 2e-6) and Self Forcing
    guidance: NonNegative = 1.0    # g of the real score: cond + g (cond - uncond)
    grad_clip: Positive = 10.0     # gradient-norm clip
    ema: Prob = 0.99               # EMA decay of the generator
    ema_start: Whole = 100         # updates before the EMA starts averaging
    log_every: Count = 20          # updates between log lines and checkpoints
    probe_every: Count = 100       # updates between small fixed switch probes, to see the metrics settle
    trust_region: bool = False     # Delta Forcing (trust_region.py), Eq. 7: writes deltaforcing.pt
    tr_step: bool = True           # ablation, False: the DMD step unscaled (no Eq. 5); the continuity gate keeps 1 - w
    tr_continuity: bool = True     # ablation, False: no continuity term (Eq. 6 and 6'), the flagged step alone
    tau: Positive = 0.0025         # Eq. 4, trust radius: the bias above the floor a window may pass on, in natural steps (tuned on seeds 0-7)
    band_levels: BandLevels = "0.4,0.45,0.5,0.55"   # Eq. 2: fixed noise levels inside the teacher's band (drift.py --probe=band)
    trust_const: Prob = 0.0        # control, > 0: w held at this value in every window instead of Eq. 4 (0: off)
    tr_floor: bool = True          # Eq. 4 (ours): tau bounds the bias above the teacher's floor f (Floor); False: f = 0 (--tau=0.005: third reading)
    mc_radius: NonNegative = 1.4   # Eq. 6, r: a new frame may move r natural steps (a step: 0.87-1.35 m, python world.py)
    lam: NonNegative = 1.0         # Eq. 7, lambda: the weight of the continuity term
    tr_appearance: bool = False    # extra, True: Eq. 6' (ours, a toy invariant) joins the continuity term
    ac_radius: NonNegative = 0.1   # Eq. 6', r_a: pooled-colour change a new frame may show, in natural steps


# small: sized for about 6 min of the whole pipeline on one H100 (teacher.py): an update is 8.1 TFLOP (bench.py),
# about 0.1 s at an expected 8% MFU, 200 updates 20 s, for each of the baseline and Delta Forcing. A checkpoint
# every 50 updates; context = one 3-frame chunk, as tiny's 2 frames are one of its chunks.
PRESETS = {"tiny": {}, "small": dict(steps=200, batch=16, ema_start=70, context=3, log_every=50)}


class Floor:
    """Eq. 4's f with --tr_floor (ours): the running median of s over the windows, among the last
    `size` supervised ones, whose video has not switched yet. There the condition still agrees with
    the history the student painted under it, so s is the verdict's floor (its noise draws, the
    teacher's imperfection), not bias; a teacher without a colour prior shows the same s everywhere.
    inf (every window trusted, w = 1) while fewer than `least` such windows are in the buffer.
    Earlier updates only: a window's w never depends on the windows beside it. On the device, no sync
    (the lower median by a sort, as nanmedian, whose CUDA kernel syncs)."""

    def __init__(self, device, size=256, least=16):
        self.buf, self.least = torch.full((size,), float("nan"), device=device), least

    def value(self):
        seen = (~self.buf.isnan()).sum()
        mid = self.buf.sort().values.gather(0, ((seen - 1) // 2).clamp(min=0).view(1))[0]   # NaNs sort last
        return torch.where(seen >= self.least, mid, torch.inf)  # Eq. 4, Delta Forcing (ours): f

    def add(self, s, unswitched):
        """s (B,) of this update's windows; unswitched (B,) bool: which count."""
        new = torch.cat([self.buf, torch.where(unswitched, s.float(), torch.nan)])
        self.buf = new[-len(self.buf):]                          # Eq. 4, Delta Forcing (ours): the last `size` windows


class Streams:
    """B long videos in progress. Their cache, schedule, position and last committed frames
    persist across optimiser steps, as LongLive's rollout state does; so does Delta Forcing's
    floor (Eq. 4's f, with --tr_floor), across videos."""

    def __init__(self, cfg, stream, size, gen, device, batch):
        self.cfg, self.stream, self.size, self.gen, self.device, self.batch = cfg, stream, size, gen, device, batch
        W, F = stream["window"], stream["window"] - cfg.context
        self.L = W + math.ceil((cfg.windows - 1) * W / F) * F       # at least `windows` teacher windows long
        self.floor = Floor(device) if cfg.trust_region and cfg.tr_floor else None   # refilled after a resume (w = 1 meanwhile)
        self.reset()

    def reset(self):
        W, s = self.stream["window"], self.stream
        self.cache = KVCache(s["n_sink"], s["n_window"])
        self.events = random_events(self.batch, self.L, s["chunk"], self.gen, p_switch=1.0,
                                    max_switches=self.cfg.max_switches, first=W)   # (B,L), per stream
        self.events = self.events.to(self.device, non_blocking=True)
        self.t, self.context = 0, None

    def advance(self, model, sigmas, exit_step):
        """Generate the next frames: a whole teacher window at the start of a video, then F new
        frames. -> the supervised window (B,W,...), its per-frame events (B,W), the new-frame
        mask (W,), and which streams' windows hold a switch (B,)."""
        W, K = self.stream["window"], self.cfg.context
        n = W if self.t == 0 else W - K
        noise = torch.randn(self.batch, n, 3, self.size, self.size, device=self.device)
        ev = self.events[:, self.t:self.t + n]
        new = rollout(model, noise, ev, sigmas, self.stream["chunk"], self.cache, exit_step=exit_step,
                      switch=self.cfg.switch_cache)
        window = new if self.context is None else torch.cat([self.context, new], 1)   # (B,W,C,H,W)
        win_ev = self.events[:, self.t + n - W:self.t + n]           # (B,W) each frame's own event
        if self.cfg.window_events == "current":
            win_ev = win_ev[:, -1:].expand(-1, W)                    # LongLive: the newest event for the whole window
        switched = (self.events[:, self.t + n - W:self.t + n] != self.events[:, self.t + n - 1:self.t + n]).any(1)
        self.unswitched = (self.events[:, :self.t + n] == self.events[:, :1]).all(1)   # (B,) no switch yet in this video
        self.context = new[:, -K:].detach()                          # committed history: context, never a graph
        self.t += n
        if self.t >= self.L:
            self.reset()
        return window, win_ev, torch.arange(W, device=self.device) >= W - n, switched


def window_loss(per_frame, window, ev, aux, mask, m, cfg, teacher, floor=0.0):
    """The one place the supervised window's per-frame DMD loss becomes a scalar."""
    if cfg.trust_region:                                         # the flags by their own names, down to the equations
        K = int((~mask).sum())
        verdict = trust_region.band_verdict(teacher, window, ev, K=K, levels=band_levels(cfg)) if K else None   # Eq. 2, Delta Forcing
        return trust_region.delta_forcing_loss(window, aux["grad"], verdict, K=K, m=m, tau=cfg.tau, lam=cfg.lam,
                                               mc_radius=cfg.mc_radius, ac_radius=cfg.ac_radius, tr_step=cfg.tr_step,
                                               tr_continuity=cfg.tr_continuity, tr_appearance=cfg.tr_appearance,
                                               trust_const=cfg.trust_const, floor=floor)
    return per_frame[:, mask].mean(), {}                         # LongLive, streaming long tuning: DMD masked to the new frames


def band_levels(cfg):
    """--band_levels as floats (config.py's BandLevels checked them when the flags were read)."""
    return [float(v) for v in cfg.band_levels.split(",")]


def tune_update(streams, *, student, critic, teacher, opt, opt_critic, cfg, sigmas, shift, m, world=1):
    """One long-tuning iteration: cfg.critic_ratio critic updates, each on the streams' next
    window generated without a graph, then one generator update on the window after that
    (graph at one exit step shared by its chunks); the streams' floor, if any, is updated here.
    -> (loss, critic loss, gnorm, applied, logs, switched)."""
    device, floor = streams.device, streams.floor
    for _ in range(cfg.critic_ratio):                            # DMD2: 5 critic updates, each on fresh samples
        with torch.no_grad(), autocast(device):
            window, ev, new, _ = streams.advance(student, sigmas, int(torch.randint(len(sigmas), ())))
        frames = new if cfg.critic_frames == "new" else None     # LongLive, streaming long tuning: critic masked too
        closs = distill.critic_update(critic, opt_critic, window.float(), ev, shift=shift, grad_clip=cfg.grad_clip,
                                      world=world, frames=frames)
    with autocast(device):
        window, ev, mask, switched = streams.advance(student, sigmas, int(torch.randint(len(sigmas), ())))
        per_frame, aux = distill.dmd_loss(window.float(), ev, teacher=teacher, critic=critic,
                                           guidance=cfg.guidance, shift=shift)
        f = floor.value() if floor is not None else 0.0          # Eq. 4, Delta Forcing (ours): f from earlier updates only
        loss, logs = window_loss(per_frame, window.float(), ev, aux, mask, m, cfg, teacher, floor=f)
    if floor is not None and "s" in logs:
        floor.add(logs["s"], streams.unswitched)
        logs["floor"] = f.expand_as(logs["s"])
    gnorm, applied = optimizer_step(student, opt, loss, cfg.grad_clip, world)
    return loss, closs, gnorm, applied, logs, switched


@torch.no_grad()
def probe(model, stream, world, n, device, seed=4321):
    """A small fixed switch probe: n videos of 4 teacher windows, the event switching halfway
    (ordered pairs cycling). Its own generators: the training stream's RNG is never touched."""
    W, ch = stream["window"], stream["chunk"]
    pairs = ordered_pairs(4)                                     # the four moving events
    ev = torch.tensor([[pairs[i % len(pairs)][t >= 2 * W] for t in range(4 * W)] for i in range(n)])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4 * W, 3, world.size, world.size, generator=gen)
    with autocast(device):
        x = rollout(model, noise.to(device), ev.to(device), stream["sigmas"], ch, KVCache(stream["n_sink"], stream["n_window"]),
                    gen=gen).float().cpu()
    return summarize(batch_metrics(x, ev, world, first=ch, chunk=ch))


def load_student(cfg):
    """Every check of longtune's inputs that needs the checkpoints, before any work."""
    path = cfg.student or os.path.join(cfg.out_dir, "student.pt")
    ck = load_checkpoint(path, ["student"], f"python distill.py --preset={cfg.preset}")
    W, ch = ck["stream"]["window"], ck["stream"]["chunk"]
    if not 0 < cfg.context < W or (W - cfg.context) % ch:
        raise BadInput(f"--context={cfg.context} must leave a whole number of {ch}-frame chunks in a {W}-frame teacher window")
    tck = load_checkpoint(ck["teacher"], ["teacher"], f"python teacher.py --preset={cfg.preset}")
    return ck, tck


def by_window_kind(seen):
    """' | switch windows w .. k .. | plain windows ..': the trust-region logs pooled over the windows
    of each kind since the last log line. seen[kind, name] = (sum, count) on the device."""
    out = ""
    for kind in ("switch", "plain"):
        parts = [f"{k} {s[0] / s[1]:.3f}" for (c, k), s in seen.items() if c == kind and s[1] > 0]
        out += f" | {kind} windows " + " ".join(parts) if parts else ""
    return out


def main(cfg):
    sck, tck = load_student(cfg)
    run = init_run(cfg, cfg.batch)
    device, stream, w = run.device, sck["stream"], load_world(sck["world"])
    name = cfg.out_name or ("deltaforcing.pt" if cfg.trust_region else "longtune.pt")
    path = os.path.join(cfg.out_dir, name)
    nets, ema = distill.dmd_nets(sck["model_args"], teacher=tck["ema"], student=sck["ema"], critic=sck["critic"], cfg=cfg,
                                 device=device, compiled=cfg.compile and device.type == "cuda")   # from the distilled student
    gen = torch.Generator().manual_seed(cfg.seed)                 # schedules: the same data for every run of a seed
    objs = dict(model=nets["student"], ema=ema, critic=nets["critic"], optimizer=nets["opt"],
                critic_optimizer=nets["opt_critic"])
    ck = resume(cfg, path, "longtune", f"python longtune.py --out_name={name}", gen, **objs)
    step, skipped = (ck["step"], ck["skipped"]) if ck else (0, 0)
    seed_rank(run, cfg.seed, step, gen)
    streams = Streams(cfg, stream, w.size, gen, device, run.batch)
    n_updates, n_probe = capped(cfg.steps, cfg), capped(24, cfg, floor=4)
    save = checkpointer(path, run, gen, dict(stage="longtune", model_args=sck["model_args"], world=sck["world"],
                                             natural_step=sck["natural_step"], stream=stream, config=asdict(cfg),
                                             teacher=sck["teacher"], student=cfg.student or "student.pt"), **objs)
    if run.rank == 0:
        print(f"long tuning {name}: {streams.L}-frame rollouts ({cfg.windows} teacher windows), windows of "
              f"{cfg.context} context + {stream['window'] - cfg.context} new frames, switch cache {cfg.switch_cache}, "
              f"window events {cfg.window_events}, {n_updates} updates at lr {cfg.lr:g} (critic {cfg.critic_lr:g})")

    t0, t_start, seen, trust = time.time(), time.time(), {}, torch.zeros(2, device=device)   # logs by window kind; sum, count of w
    for step in tqdm(range(step, n_updates), initial=step, total=n_updates, desc="longtune", mininterval=5,
                     disable=run.rank > 0):
        loss, closs, gnorm, applied, logs, switched = tune_update(
            streams, **nets, cfg=cfg, sigmas=stream["sigmas"], shift=stream["shift"], m=sck["natural_step"], world=run.world)
        skipped = skipped + ~applied                              # a skipped step is counted on the device
        if "w" in logs:                                           # the run's mean trust, for the constant-w control
            trust += torch.stack([logs["w"].sum(), torch.tensor(float(len(logs["w"])), device=device)])
        ema_update(ema, nets["student"], cfg.ema if step >= cfg.ema_start else 0.0)   # (a skipped step left the weights as they were)
        for kind, sel in (("switch", switched), ("plain", ~switched)):   # summed on the device: no sync per step
            for k, v in logs.items():
                seen[kind, k] = seen.get((kind, k), 0) + torch.stack([torch.where(sel, v.float(), 0).sum(), sel.sum()])
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_updates:
            dt = (time.time() - t0) / cfg.log_every
            extra, seen = by_window_kind(seen), {}
            if run.rank == 0:
                tqdm.write(f"longtune {step + 1} | dmd loss {loss.item():.4f} | critic loss {closs.item():.4f} | "
                           f"gnorm {gnorm:.3f}{extra} | {dt:.2f} s/update | skipped {int(skipped)}")
            t0 = time.time()
            save(step=step + 1, skipped=int(skipped), metrics={})   # the checkpoint holds the next update to run
        if run.rank == 0 and (step + 1) % cfg.probe_every == 0 and step + 1 < n_updates:
            p = probe(ema, stream, w, n_probe, device)
            tqdm.write(f"probe {step + 1} (ema): " + " ".join(f"{k} {p[k]:.3f}" for k in ("react", "latency", "follow",
                                                                                        "identity", "valid", "bias")))
    check_in_sync(nets["student"], run)
    if run.rank > 0:
        return
    metrics = probe(ema, stream, w, n_probe, device)
    metrics["train_minutes"] = (time.time() - t_start) / 60
    if trust[1] > 0:
        metrics["mean_w"] = float(trust[0] / trust[1])           # over the windows with history since the (re)start
    print(f"probe {n_updates} (ema): " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    save(step=n_updates, skipped=int(skipped), metrics=metrics)
    print(f"wrote {path}; evaluate it with `python evaluate.py --ckpts={path}`")


if __name__ == "__main__":
    cli(main, LongtuneConfig, PRESETS)
