"""Streaming long tuning with event switches (LongLive, Yang et al. 2025), the baseline that Delta
Forcing improves on; with --trust_region=True the window loss becomes Delta Forcing's.

The student rolls out long videos (default 8 teacher windows) chunk by chunk through its KV
cache, with sink and rolling window; the rollout state persists across optimiser steps. Each
video switches event 1..max_switches times at its own chunk boundaries, and at a switch that
stream's cache is recomputed under the new event, its sink keeping the old one (--switch_cache).
Each iteration advances every stream by F new frames and supervises the newest teacher-length
window, K detached context frames plus the F new ones, with the DMD loss of distill.py, masked to the new frames. The
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
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

import distill
import trust_region
from common import (autocast, check_in_sync, checkpointer, ema_update, init_run, load_checkpoint, optimizer_step,
                    resume, seed_rank)
from config import BadInput, BandLevels, Count, NonNegative, OneOf, Positive, Prob, SwitchCache, Whole, capped, cli
from distill import random_exit_step
from metrics import batch_metrics, mean_over_videos
from streaming import KVCache, rollout
from world import World, ordered_pairs, random_events


@dataclass
class LongtuneConfig(distill.DMDConfig):
    """Long tuning's knobs; DMD's (distill.DMDConfig) with more updates, a smaller batch, a later EMA and
    sparser logs."""
    out_name: str = ""             # default longtune.pt (deltaforcing.pt with --trust_region=True)
    student: str = ""              # default out_dir/student.pt
    windows: Count = 8             # rollout length, in teacher windows
    context: Count = 2             # K detached context frames in each supervised window
    switch_cache: SwitchCache = "recache_window"  # at every switch, per stream: recache_window | recache | keep | clear
    window_events: OneOf("true", "current") = "true"   # true: each frame's own event | current: the newest frame's (LongLive)
    critic_frames: OneOf("window", "new") = "window"   # the critic learns the whole window | only its new frames (LongLive)
    max_switches: Count = 3        # switches per long video: 1 .. max_switches
    dmd_steps: Count = 400         # generator updates, each after critic_ratio critic updates on fresh windows
    batch: Count = 8               # streams (the global batch under torchrun)
    ema_start: Whole = 100         # updates before the EMA starts averaging
    log_every: Count = 20          # updates between log lines and checkpoints
    probe_every: Count = 100       # updates between small fixed switch probes, to see the metrics settle
    trust_region: bool = False     # Delta Forcing, DF (7) (trust_region.py): writes deltaforcing.pt
    tr_step: bool = True           # ablation, False: the DMD step as it is (no DF (5) or (5')); the continuity gate keeps 1 - w
    tr_continuity: bool = True     # ablation, False: no continuity term (DF (6) and (6')), the trust-region step alone
    tau: Positive = 0.0025         # DF (4), trust radius: the bias above the floor a window may pass on, in natural steps
    band_levels: BandLevels = "0.4,0.45,0.5,0.55"   # DF (2): fixed noise levels inside the teacher's band (tools.drift --probe=band)
    tr_restore: bool = True        # DF (5'): along the bias direction follow the teacher without the event; False: DF (5), scale
    trust_const: Prob = 0.0        # control, > 0: w held at this value in every window instead of DF (4) (0: off)
    trust_shuffle: bool = False    # control: DF (4)'s w values permuted over the batch's windows
    trust_schedule: Prob = 0.0     # control, > 0: w at this value in windows of videos that switched, 1 elsewhere (0: off)
    tr_floor: bool = True          # DF (4): tau bounds the bias above the verdict's floor s0 (trust_region.Floor); False: s0 = 0
    mc_radius: NonNegative = 1.4   # DF (6), r: a new frame may move r natural steps (python world.py prints a step's size)
    lam: NonNegative = 1.0         # DF (7), lambda: the weight of the continuity term
    tr_appearance: bool = False    # extra, True: DF (6') (a toy invariant) joins the continuity term
    ac_radius: NonNegative = 0.1   # DF (6') and (6''), r_a: pooled-colour change a new frame may show, in natural steps
    tr_anchor: bool = False        # candidate, True: DF (6'') (a toy invariant), appearance anchored before the switch, joins (6)
    tr_literal: bool = False       # candidate, True: the abstract's literal delta, DF (3L), with the whole step bounded, DF (5L)
    tr_verdict: OneOf("committed", "window") = "committed"   # DF (2) on the K committed frames | candidate: every frame
    renamed = {"ema": "ema_decay", "steps": "dmd_steps"}


# small: one GPU, sized for about 6 min of the whole chain on one H100 (docs/defaults.md)
PRESETS = {"tiny": {}, "small": dict(dmd_steps=200, batch=16, ema_start=70, context=3, log_every=50)}


class Streams:
    """B long videos in progress. Their cache, schedule, position and last committed frames
    persist across optimiser steps, as LongLive's rollout state does."""

    def __init__(self, cfg, stream, size, gen, device, batch):
        self.cfg, self.stream, self.size, self.gen, self.device, self.batch = cfg, stream, size, gen, device, batch
        W, F = stream["window"], stream["window"] - cfg.context
        self.L = W + math.ceil((cfg.windows - 1) * W / F) * F       # at least `windows` teacher windows long
        self.reset()

    def reset(self):
        W, s = self.stream["window"], self.stream
        self.cache = KVCache(s["n_sink"], s["n_window"])
        self.events = random_events(self.batch, self.L, s["chunk"], self.gen, p_switch=1.0,
                                    max_switches=self.cfg.max_switches, first=W)   # (B,L), per stream
        self.events = self.events.to(self.device, non_blocking=True)
        self.t, self.context, self.anchor = 0, None, None

    def advance(self, model, sigmas, exit_step):
        """Generate the next frames: a whole teacher window at the start of a video, then F new
        frames. -> the supervised window (B,W,...), its per-frame events (B,W), the new-frame
        mask (W,), and which streams' windows hold a switch (B,). Sets `unswitched` (B,): which
        videos have not switched yet (DF (4)'s floor reads those windows), and `anchor` (B,C,H,W):
        the last frame before each video's latest switch, or its first frame (DF (6''))."""
        W, K = self.stream["window"], self.cfg.context
        n = W if self.t == 0 else W - K
        noise = torch.randn(self.batch, n, 3, self.size, self.size, device=self.device)
        ev = self.events[:, self.t:self.t + n]
        new = rollout(model, noise, ev, sigmas, self.stream["chunk"], self.cache, exit_step=exit_step,
                      switch=self.cfg.switch_cache)
        window = new if self.context is None else torch.cat([self.context, new], 1)   # (B,W,C,H,W)
        if self.cfg.tr_anchor:                                       # DF (6'') only: no work where nothing reads it
            self.mark_anchor(new, ev)
        win_ev = self.events[:, self.t + n - W:self.t + n]           # (B,W) each frame's own event
        if self.cfg.window_events == "current":
            win_ev = win_ev[:, -1:].expand(-1, W)                    # LongLive: the newest event for the whole window
        holds_switch = (self.events[:, self.t + n - W:self.t + n] != self.events[:, self.t + n - 1:self.t + n]).any(1)
        self.unswitched = (self.events[:, :self.t + n] == self.events[:, :1]).all(1)
        self.context = new[:, -K:].detach()                          # committed history: context, never a graph
        self.t += n
        if self.t >= self.L:
            self.reset()
        return window, win_ev, torch.arange(W, device=self.device) >= W - n, holds_switch


    def mark_anchor(self, new, ev):
        """Set self.anchor (B,C,H,W), DF (6'')'s, after n new frames with their events ev (B,n): a video's
        first frame at its start; where a video switches among the new frames, the frame just before
        its last switch there; elsewhere the anchor it had."""
        if self.context is None:
            self.anchor = new[:, 0].detach()                         # a video's first frame
            return
        evs = torch.cat([self.events[:, self.t - 1:self.t], ev], 1)  # the event before each new frame, then theirs
        frames = torch.cat([self.context[:, -1:], new], 1).detach()  # the frame before each new frame, then them
        switch = evs[:, 1:] != evs[:, :-1]                            # (B,n): new frame j starts another event
        last = (switch * torch.arange(1, len(ev[0]) + 1, device=ev.device)).argmax(1)   # its index j, 0 if none
        before = frames[torch.arange(len(ev), device=ev.device), last]
        self.anchor = torch.where(switch.any(1)[:, None, None, None], before, self.anchor)


def window_loss(per_frame, window, ev, aux, mask, *, teacher, m, tr, unswitched=None, anchor=None):
    """The one place the supervised window's loss is made: LongLive's DMD masked to the new frames,
    or with tr (trust_region.TrustRegion) Delta Forcing's, DF (7), at the floor of earlier updates.
    aux: dmd_loss's steps; unswitched (B,): which windows' videos have not switched yet; anchor: DF (6'')'s.
    -> (the loss, the logs: each window's w, s, mc and floor, empty for the baseline)."""
    if tr is None:
        return per_frame[:, mask].mean(), {}                     # LongLive: DMD on the window's new frames
    K, s0 = int((~mask).sum()), tr.s0()
    asks = K and not tr.tr_literal                               # DF (3L) reads DMD's own forward instead
    read = K if tr.tr_verdict == "committed" else window.shape[1]   # the frames DF (2) reads
    verdict = trust_region.band_verdict(teacher, window, ev, frames=read, levels=tr.levels) if asks else None   # DF (2)
    loss, logs = trust_region.delta_forcing_loss(window, aux["grad"], verdict, K=K, m=m, tr=tr, s0=s0,
                                                 grad_null=aux["grad_null"], unswitched=unswitched,
                                                 real=aux["real"], anchor=anchor)
    if tr.floor is not None and logs:
        logs["floor"] = torch.as_tensor(s0, device=window.device).expand_as(logs["s"])
    return loss, logs


def tune_update(streams, nets, cfg, *, stream, m, tr=None, n_ranks=1):
    """One long-tuning iteration: cfg.critic_ratio critic updates, each on the streams' next window
    generated without a graph, then one generator update on the window after that (graph at one
    exit step shared by its chunks), with window_loss (LongLive's, or with tr, trust_region.TrustRegion,
    Delta Forcing's, whose floor then learns this update's windows).
    -> (loss, critic loss, gnorm, applied, logs, holds_switch)."""
    device, sigmas = streams.device, stream["sigmas"]
    for _ in range(cfg.critic_ratio):                            # DMD2: 5 critic updates, each on fresh samples
        with torch.no_grad(), autocast(device):
            window, ev, new, _ = streams.advance(nets.student, sigmas, random_exit_step(sigmas))
        frames = new if cfg.critic_frames == "new" else None     # LongLive: the critic masked too
        closs = distill.critic_update(nets, window.float(), ev, shift=stream["shift"], grad_clip=cfg.grad_clip,
                                      n_ranks=n_ranks, frames=frames)
    with autocast(device):
        window, ev, mask, holds_switch = streams.advance(nets.student, sigmas, random_exit_step(sigmas))
        window = window.float()
        per_frame, aux = distill.dmd_loss(window, ev, teacher=nets.teacher, critic=nets.critic,
                                           guidance=cfg.guidance, shift=stream["shift"])
        loss, logs = window_loss(per_frame, window, ev, aux, mask, teacher=nets.teacher, m=m, tr=tr,
                                 unswitched=streams.unswitched, anchor=streams.anchor)
    if tr is not None and tr.floor is not None and "s" in logs:
        tr.floor.add(logs["s"], streams.unswitched)              # DF (4): after this update's loss, never before
    gnorm, applied = optimizer_step(nets.student, nets.opt, loss, cfg.grad_clip, n_ranks)
    return loss, closs, gnorm, applied, logs, holds_switch


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
    return mean_over_videos(batch_metrics(x, ev, world, first=ch, chunk=ch))


def check_knobs(cfg):
    """Delta Forcing's knobs do nothing without --trust_region=True, and the literal reading reads no
    band verdict: say so rather than train something else than was asked."""
    default = LongtuneConfig()
    changed = [f.name for f in fields(trust_region.TrustRegion) if f.init and getattr(cfg, f.name) != getattr(default, f.name)]
    if changed and not cfg.trust_region:
        raise BadInput(f"--{changed[0]}={getattr(cfg, changed[0])} is a Delta Forcing knob: add --trust_region=True")
    if cfg.tr_literal and cfg.tr_verdict != "committed":
        raise BadInput(f"--tr_literal=True reads no band verdict: drop --tr_verdict={cfg.tr_verdict}")


def load_student(cfg):
    """Every check of longtune's inputs that needs the checkpoints, before any work."""
    check_knobs(cfg)
    path = cfg.student or os.path.join(cfg.out_dir, "student.pt")
    ck = load_checkpoint(path, ["student"], f"python distill.py --preset={cfg.preset}")
    W, ch = ck["stream"]["window"], ck["stream"]["chunk"]
    if not 0 < cfg.context < W or (W - cfg.context) % ch:
        raise BadInput(f"--context={cfg.context} must leave a whole number of {ch}-frame chunks in a {W}-frame teacher window")
    tck = load_checkpoint(ck["teacher"], ["teacher"], f"python teacher.py --preset={cfg.preset}")
    return ck, tck


def main(cfg):
    sck, tck = load_student(cfg)
    run = init_run(cfg, cfg.batch)
    device, stream, w = run.device, sck["stream"], World(**sck["world"])
    name = cfg.out_name or ("deltaforcing.pt" if cfg.trust_region else "longtune.pt")
    path = os.path.join(cfg.out_dir, name)
    nets = distill.dmd_nets(sck["model_args"], teacher=tck["ema"], student=sck["ema"], critic=sck["critic"], cfg=cfg,
                            device=device, compiled=cfg.compile and device.type == "cuda")   # from the distilled student
    tr = trust_region.TrustRegion.from_config(cfg) if cfg.trust_region else None   # its floor refills after a resume
    gen = torch.Generator().manual_seed(cfg.seed)                 # schedules: the same data for every run of a seed
    objs = dict(model=nets.student, ema=nets.ema, critic=nets.critic, optimizer=nets.opt, critic_optimizer=nets.opt_critic)
    remake = f"python longtune.py --out_name={name}" + (" --trust_region=True" if cfg.trust_region else "")
    ck = resume(cfg, path, "longtune", remake, gen, **objs)
    step, skipped = (ck["step"], ck["skipped"]) if ck else (0, 0)
    seed_rank(run, cfg.seed, step, gen)
    streams = Streams(cfg, stream, w.size, gen, device, run.batch)
    n_updates, n_probe = capped(cfg.dmd_steps, cfg), capped(24, cfg, floor=4)
    save = checkpointer(path, run, gen, dict(stage="longtune", model_args=sck["model_args"], world=sck["world"],
                                             natural_step=sck["natural_step"], stream=stream, config=asdict(cfg),
                                             teacher=sck["teacher"], student=cfg.student or "student.pt"), **objs)
    if run.rank == 0:
        print(f"long tuning {name}: {streams.L}-frame rollouts ({cfg.windows} teacher windows), windows of "
              f"{cfg.context} context + {stream['window'] - cfg.context} new frames, switch cache {cfg.switch_cache}, "
              f"window events {cfg.window_events}, {n_updates} updates at lr {cfg.lr:g} (critic {cfg.critic_lr:g})")

    t0, t_start, seen, trust = time.time(), time.time(), {}, [0.0, 0, 0]   # logs by kind; sum of w, windows, of switched videos
    for step in tqdm(range(step, n_updates), initial=step, total=n_updates, desc="longtune", mininterval=5,
                     disable=run.rank > 0):
        loss, closs, gnorm, applied, logs, holds_switch = tune_update(streams, nets, cfg, stream=stream, m=sck["natural_step"],
                                                                  tr=tr, n_ranks=run.n_ranks)
        skipped += not applied
        ema_update(nets.ema, nets.student, cfg.ema_decay if step >= cfg.ema_start else 0.0)
        if "w" in logs:                                           # the run's mean trust, for the controls on w
            trust = [trust[0] + float(logs["w"].sum()), trust[1] + len(logs["w"]), trust[2] + int((~streams.unswitched).sum())]
        for kind, sel in (("switch", holds_switch), ("plain", ~holds_switch)):
            for k, v in logs.items():
                total, n = seen.get((kind, k), (0.0, 0))
                seen[kind, k] = (total + float(v[sel].float().sum()), n + int(sel.sum()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_updates:
            dt = (time.time() - t0) / cfg.log_every
            extra = "".join(f" | {kind} windows " + " ".join(f"{k} {t / n:.3f}" for (c, k), (t, n) in seen.items() if c == kind)
                            for kind in ("switch", "plain") if any(c == kind and n for (c, _), (_, n) in seen.items()))
            seen = {}
            if run.rank == 0:
                tqdm.write(f"longtune {step + 1} | dmd loss {loss.item():.4f} | critic loss {closs.item():.4f} | "
                           f"gnorm {gnorm:.3f}{extra} | {dt:.2f} s/update | skipped {skipped}")
            t0 = time.time()
            save(step=step + 1, skipped=skipped, metrics={})      # the checkpoint holds the next update to run
        if run.rank == 0 and (step + 1) % cfg.probe_every == 0 and step + 1 < n_updates:
            p = probe(nets.ema, stream, w, n_probe, device)
            tqdm.write(f"probe {step + 1} (ema): " + " ".join(f"{k} {p[k]:.3f}" for k in ("react", "latency", "follow",
                                                                                        "identity", "valid", "bias")))
    check_in_sync(nets.student, run)
    if run.rank > 0:
        return
    metrics = probe(nets.ema, stream, w, n_probe, device)
    metrics["train_minutes"] = (time.time() - t_start) / 60
    if trust[1] > 0:
        metrics["mean_w"] = trust[0] / trust[1]                  # over the windows with history since the (re)start
        metrics["switched_share"] = trust[2] / trust[1]          # of them, windows of videos that had switched
    print(f"probe {n_updates} (ema): " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    save(step=n_updates, skipped=skipped, metrics=metrics)
    print(f"wrote {path}; evaluate it with `python -m tools.evaluate --ckpts={path}`")


if __name__ == "__main__":
    cli(main, LongtuneConfig, PRESETS)
