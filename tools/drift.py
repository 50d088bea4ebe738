"""Where drift comes from: the probes behind the conditional-bias question (Delta Forcing sec. 1:
a teacher that is condition-aligned but trajectory-agnostic passes its bias to the generator).

    python -m tools.drift --ckpts=out/student.pt,out/longtune.pt --first_seed=100 --seeds=4
    python -m tools.drift --probe=verdicts --ckpts=out/longtune.pt --first_seed=100 --seeds=4
    python -m tools.drift --probe=band --teacher=out/teacher.pt --picture=out/band.png
    python -m tools.drift --probe=signals --ckpts=out/student.pt,out/longtune.pt --seeds=4
    python -m tools.drift --probe=curve --ckpts=out/longtune.pt,out/deltaforcing.pt --lengths=16 --after=48

videos: how often and how soon a generator recolours after a switch; curve: pull frame by frame after it; verdicts: what the teacher and critic paint
on its windows; band: where the teacher is biased but not blind; signals: which signal tells windows apart (DF (3)).
"""

import sys

if not __package__:   # run as a file, the stages are not on the path: say how to run it
    print("run it from the repository root as: python -m tools.drift [--key=value ...]", file=sys.stderr)
    sys.exit(2)

import os
from dataclasses import dataclass

import numpy as np
import torch

import longtune
import trust_region as tr
from common import autocast, check_file, load_checkpoint, pick_device
from config import BadInput, BandLevels, Config, Count, OneOf, Prob, SwitchCache, Whole, cli
from distill import dmd_sigma, random_exit_step
from metrics import PULL, batch_metrics, pulled, track
from model import add_noise, build, cfg_mix, cond_uncond, forward_with_cfg, pred_x0
from sample import generate, load_generator
from tools.stats import interval
from world import CANON, World, ordered_pairs, sample_videos, save_strip, schedule_events


@dataclass
class DriftConfig(Config):
    ckpts: str = "out/student.pt,out/longtune.pt"   # comma-separated generator checkpoints, a block of rows each
    probe: OneOf("videos", "curve", "verdicts", "band", "signals") = "videos"   # videos | curve | verdicts | band | signals (top)
    teacher: str = "out/teacher.pt"  # --probe=verdicts, band and signals: the teacher checkpoint
    lengths: str = ""              # frames of the old event before the switch, multiples of the chunk (default: 1, 2, 4 windows)
    after: Whole = 0               # frames of the new event after the switch (default: 4 teacher windows)
    policies: str = "recache_window,recache,keep"   # cache policies at the switch, one row each
    sigmas: BandLevels = "0.3,0.5,0.7,0.8,0.9"   # --probe=verdicts and band: the fixed noise levels
    seeds: Count = 4               # video seeds per ordered pair (12 pairs); --probe=signals: stream seeds, 8 streams each
    windows: Count = 40            # --probe=signals: windows per stream seed
    first_seed: Whole = 100        # seeds first_seed .. first_seed + seeds - 1
    picture: str = ""              # --probe=band: a PNG of one clip and the teacher's x0 at each level, 8x
    scores: str = ""               # --probe=signals: also write each checkpoint's window scores, labels, streams: PATH_<ckpt>.npz
    match_w: Prob = 0.0            # --probe=signals, > 0: print each signal's tau at which DF (4) averages this w (all --ckpts' windows)
    md: str = ""                   # also append the markdown table to this file


PRESETS = {"tiny": {}, "small": {}}
SHARES = "keeps position | keeps colour | paints the event's | position and paints | frames"


def switch_videos(g, L, after, seeds, policy):
    """Videos of the 12 ordered pairs x seeds (pair i: seeds 1000 i + s): the old event for L frames, the
    new one for `after`. -> events (N,T), videos (N,T,...); the new event is each row's last."""
    pairs = [p for p in ordered_pairs(4) for _ in seeds]                        # pair-major
    ev = torch.stack([schedule_events([(a, 0), (b, L)], L + after, g.chunk) for a, b in pairs])
    return ev, generate(g, ev, [1000 * i + s for i in range(len(ordered_pairs(4))) for s in seeds], policy)


def onset(tracked, f, new):
    """Frames from the switch at f until the sprite holds event new's canonical colour two frames running (None: never)."""
    held = (np.asarray(tracked["color_id"]) == CANON[new]) & tracked["valid"]
    hits = np.flatnonzero(held[f:-1] & held[f + 1:])
    return int(hits[0]) if len(hits) else None


def video_rows(cfg, path, g, lengths, policies):
    """Per cache policy and old-event length L: react, identity, bias (recolours toward the new event's
    canonical colour), pull, each mean +- 95% interval over seeds, and the recolours' mean onset."""
    seeds, rows = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)), []
    for policy in policies:
        for L in lengths:
            ev, x = switch_videos(g, L, cfg.after, seeds, policy)
            m = batch_metrics(x, ev, g.world, first=g.chunk, chunk=g.chunk)
            cells = [interval(np.array(m[k]).reshape(-1, len(seeds))) for k in ("react", "identity", "bias", "pull")]
            onsets = [onset(track(v, g.world), L, new) for v, b, new in zip(x, m["bias"], ev[:, -1].tolist()) if b == 1.0]
            known = [o for o in onsets if o is not None]
            rows.append(f"| {path} | {policy} | {L} | " + " | ".join(f"{c['mean']:.3f} +- {c['ci95']:.3f}" for c in cells)
                        + f" | {np.mean(known) if known else float('nan'):.1f} ({len(known)}) |")
    return rows


CURVE_AT = (0, 2, 4, 8, 12, 16, 24, 32, 40, 47)                # frames after the switch, as columns


def curve_rows(cfg, path, g, lengths):
    """Pull frame by frame: after one switch following L frames of the old event, the share of switches
    whose sprite colour at frame f after it came PULL closer to the new event's canonical colour than its
    mean colour before (pull's rule, metrics.py, one frame at a time; an untracked frame is not pulled)."""
    seeds, rows = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)), []
    for L in lengths:
        ev, x = switch_videos(g, L, cfg.after, seeds, "recache_window")
        hits, n = np.zeros(cfg.after), 0
        for v, new in zip(x, ev[:, -1].tolist()):
            t, c = track(v, g.world), g.world.colors[max(CANON[new], 0)].numpy()
            b = t["color"][:L][t["valid"][:L]].mean(0) if t["valid"][:L].any() else c
            if CANON[new] < 0 or np.linalg.norm(b - c) < PULL:       # as pull: counted where it could show
                continue
            hits += t["valid"][L:] & pulled(t["color"][L:], b, c)
            n += 1
        rows.append(f"| {path} | {L} | " + " | ".join(f"{hits[f] / max(n, 1):.2f}" for f in CURVE_AT if f < cfg.after)
                    + f" | {n} |")
    return rows


def kept_and_painted(x0, x, ev, w):
    """Over x's (N,T,...) frames whose sprite is not of their event's canonical colour, the shares of x0
    frames that keep its position (within a pixel), keep its colour, paint it the event's colour, and keep
    the position while painting (the last high: biased, not blind). -> (the four shares, frames counted)."""
    hits, n = np.zeros(4), 0
    for a, b, e in zip(x, x0, ev.tolist()):
        ta, tb, canon = track(a, w), track(b, w), np.array(CANON)[e]
        counted = ta["valid"] & (canon >= 0) & (ta["color_id"] != canon)
        d = (tb["pos"] - ta["pos"] + w.size / 2) % w.size - w.size / 2             # torus distance
        pos, paint = tb["valid"] & (np.abs(d).max(-1) <= 1), tb["valid"] & (tb["color_id"] == canon)
        hits += np.stack([pos, tb["valid"] & (tb["color_id"] == ta["color_id"]), paint, paint & pos])[:, counted].sum(1)
        n += int(counted.sum())
    return (*(hits / max(n, 1)).tolist(), n)


@torch.no_grad()
def x0_at(net, x, ev, sigma, seed, device, guidance=0.0):
    """net's x0 from x (N,T,...) noised to level sigma by noise from `seed`, guided as DMD's real score."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    s, ev = torch.full(ev.shape, sigma, device=device), ev.to(device)
    xt = add_noise(x.to(device), eps.to(device), s)
    with autocast(device):
        return pred_x0(xt, forward_with_cfg(net, xt, s, ev, guidance).float(), s).cpu()


def row(*cells, r):
    return "| " + " | ".join([*map(str, cells), *(f"{v:.3f}" for v in r[:4]), str(r[4])]) + " |"


def verdict_rows(cfg, path, g, teacher, sigmas, device):
    """The teacher's (with the checkpoint's DMD guidance) and the critic's verdicts on teacher windows
    of g's videos wholly before, across and wholly after the switch, each frame under its own event."""
    W, seeds = g.stream["window"], list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py")
    critic, g_real = build(ck["model_args"], ck["critic"], device).eval(), ck["config"]["guidance"]
    ev, x = switch_videos(g, 2 * W, 2 * W, seeds, "recache_window")
    kinds = {"before": slice(W, 2 * W), "across": slice(2 * W - W // 2, 2 * W + W // 2), "after": slice(3 * W, 4 * W)}
    return [row(path, name, kind, f"{sigma:.2f}", r=kept_and_painted(
                x0_at(net, x[:, s], ev[:, s], sigma, cfg.first_seed, device, gd), x[:, s], ev[:, s], g.world))
            for sigma in sigmas for name, net, gd in (("teacher", teacher, g_real), ("critic", critic, 0.0))
            for kind, s in kinds.items()]


def band_rows(cfg, tck, teacher, sigmas, device):
    """The teacher on real one-event clips whose sprite is not of the event's colour, as in a window
    wholly after a switch (64 clips per seed); --picture: one clip, then its x0 at each level."""
    w, W = World(**tck["world"]), tck["config"]["frames"]
    ev = torch.arange(64 * cfg.seeds)[:, None].remainder(4).expand(-1, W)        # the four moving events
    x, color, _ = sample_videos(w, ev, torch.Generator().manual_seed(cfg.first_seed))   # uniform colours
    off = torch.tensor(CANON)[ev[:, 0]] != color                                 # not the event's colour
    x0s = [x0_at(teacher, x[off], ev[off], sigma, cfg.first_seed, device, tck["config"]["guidance"]) for sigma in sigmas]
    if cfg.picture:
        save_strip(cfg.picture, torch.cat([x[off][:1]] + [x0[:1] for x0 in x0s]))
    return [row(cfg.teacher, f"{sigma:.2f}", r=kept_and_painted(x0, x[off], ev[off], w)) for sigma, x0 in zip(sigmas, x0s)]


def auc(score, label, stream, boot=1000):
    """P(a mismatched window scores above a matched one), ties half; 95% interval by a bootstrap over
    streams (each window's stream id in `stream`): the windows of one stream are correlated, so a stream
    is resampled whole, not window by window."""
    def one(s, y):
        a, b = s[y], s[~y]
        return float(((a[:, None] > b[None]) + 0.5 * (a[:, None] == b[None])).mean()) if len(a) and len(b) else np.nan
    ids = np.unique(stream)
    members = [np.flatnonzero(stream == i) for i in ids]
    rng = np.random.default_rng(0)
    boots = [one(score[i], label[i]) for i in (np.concatenate([members[j] for j in rng.integers(0, len(ids), len(ids))])
                                                  for _ in range(boot))]
    return one(score, label), *np.nanpercentile(boots, [2.5, 97.5])   # a resample without both kinds is nan


SIGNALS = {"k": "k = rms(T - G) / m at the DMD level: teacher minus critic",
           "literal": "DF (3L): rms_f ||(T_f - c_K) - (z_f - c_K)|| / m on the new frames at the DMD level, the abstract's literal delta",
           "verdict_dmd": "condition's verdict T^e - T^0, per-channel means, at the DMD level (no extra forward)",
           "verdict_band": "condition's verdict, per-channel means, at the band levels (DF (3), the default)",
           "verdict_window": "the band verdict over every frame of the window, not only the committed ones",
           "verdict_b": "the band verdict's mean ||b|| in place of its RMS (the committed frames)",
           "verdict_old": "the band verdict of the new event against the old one (T^e - T^old) in place of the null event",
           "switch": "reference: the window holds a switch (the schedule, not a signal)"}


def old_events(past, ev):
    """verdict_old's events: each frame's own event, the video's newest event replaced by the one it
    switched from (unchanged in a video that never switched). past (B,t): each stream's events up to
    the window's last frame; ev (B,W): the window's."""
    newest, old = ev[:, -1], ev[:, -1].clone()
    for b in range(len(ev)):
        before = past[b][past[b] != newest[b]]
        if len(before):
            old[b] = before[-1]
    return torch.where(ev == newest[:, None], old[:, None], ev)


def tau_for_mean_w(s, floor, target, eps=1e-6):
    """The tau at which DF (4), w = min(1, tau / (relu(s - floor) + eps)), averages `target` over the
    windows' scores s: how a signal on another scale gets the default's mean trust (a bisection)."""
    lo, hi, s = 1e-9, 1e3, torch.as_tensor(s, dtype=torch.float64)
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if float(tr.trust_weight(s, mid, floor, eps).mean()) < target else (lo, mid)
    return hi


def scores_path(cfg, path):
    """--scores=out/sig.npz: one file per checkpoint, out/sig_<checkpoint name>.npz."""
    return cfg.scores.removesuffix(".npz") + "_" + os.path.basename(path).removesuffix(".pt") + ".npz"


def band_verdict_seeded(teacher, window, ev, W, levels, seed):
    """DF (2) over all W frames of the window, from noise drawn by `seed`: two calls with one seed
    share their noise, so their difference is the events' alone."""
    with torch.random.fork_rng(devices=[window.device] if window.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return tr.band_verdict(teacher, window, ev, frames=W, levels=levels)


def signal_rows(cfg, path, teacher, device):
    """Windows of `path` as longtune.py trains on them, scored from their K committed frames (T, G: DMD's
    real and fake x0 at one DMD level per window; T^e, T^0: the teacher's with and without the event): each
    candidate's AUC (mismatched: the last committed sprite is not of the newest event's canonical colour),
    and DF (3)'s s by kind of window."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py")
    lt = longtune.LongtuneConfig(**longtune.PRESETS[cfg.preset])   # the windows of this preset's long tuning
    critic, gen_net = (build(ck["model_args"], ck[k], device).eval() for k in ("critic", "ema"))
    w, st, m, levels = World(**ck["world"]), ck["stream"], ck["natural_step"], tr.TrustRegion.from_config(lt).levels
    scores, labels, fresh, lane = {}, [], [], []
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        torch.manual_seed(seed)
        streams = longtune.Streams(lt, st, w.size, torch.Generator().manual_seed(seed), device, 8)
        for i in range(cfg.windows):
            events, t = streams.events, streams.t                # before the advance: the stream's whole schedule
            with torch.no_grad(), autocast(device):
                window, ev, mask, holds_switch = streams.advance(gen_net, st["sigmas"], random_exit_step(st["sigmas"]))
                window, K = window.float(), int((~mask).sum())
                if not K:                                        # a video's first window: nothing committed yet
                    continue
                ev_old = old_events(events[:, :t + len(window[0]) - K], ev)
                sigma = dmd_sigma(len(window), st["shift"], device)[:, None].expand(ev.shape)
                xt = add_noise(window, torch.randn_like(window), sigma)
                t_e, t_0 = (pred_x0(xt, v.float(), sigma) for v in cond_uncond(teacher, xt, sigma, ev))
                real, W = cfg_mix(t_e, t_0, ck["config"]["guidance"]), len(window[0])              # DMD's real x0
                t_g = real - pred_x0(xt, critic(xt, sigma, ev).float(), sigma)
                v_e, v_old = (band_verdict_seeded(teacher, window, e, W, levels, 1000 * seed + i) for e in (ev, ev_old))
                verdict = v_e[:, :, :K]                                                             # DF (2)
                hw = window.shape[-1] * window.shape[-2]
                sc = dict(k=tr.frame_norm(t_g[:, :K]).pow(2).mean(1).sqrt() / m, switch=holds_switch.float(),
                          literal=tr.literal_consistency(real[:, K:], window[:, K:], m),          # DF (3L)
                          verdict_dmd=tr.transition_consistency((t_e - t_0)[:, None, :K], m)[0],
                          verdict_band=tr.transition_consistency(verdict, m)[0],                    # DF (3)
                          verdict_window=tr.transition_consistency(v_e, m)[0],
                          verdict_b=tr.transition_consistency(verdict, m)[1].norm(dim=-1) * hw ** 0.5 / m,
                          verdict_old=tr.transition_consistency((v_e - v_old)[:, :, :K], m)[0])
            for b in range(len(window)):
                last, e = track(window[b, K - 1:K], w), int(ev[b, -1])
                if last["valid"][0] and CANON[e] >= 0:
                    labels.append(last["color_id"][0] != CANON[e])
                    fresh.append(bool(streams.unswitched[b]))        # no switch yet in its video: the floor's windows
                    lane.append(seed * 1000 + b)                     # its stream: seed and lane (videos follow on)
                    for name, v in sc.items():
                        scores.setdefault(name, []).append(float(v[b]))
    if not labels:
        raise BadInput(f"{path}: no training window has a tracked sprite under an event with a colour (an untrained generator?)")
    sc, y, u = {k: np.array(v) for k, v in scores.items()}, np.array(labels), np.array(fresh)
    rows = [f"| {path} | {text} | " + "{:.3f} [{:.3f}, {:.3f}]".format(*auc(sc[name], y, np.array(lane))) + f" | {y.sum()} / {len(y)} |"
            for name, text in SIGNALS.items()]
    if cfg.scores:
        np.savez(scores_path(cfg, path), label=y, unswitched=u, stream=np.array(lane), **sc)
    s = sc["verdict_band"]                                       # DF (3)'s s: its level, which a fixed tau reads
    med = lambda sel: f"{np.median(s[sel]):.4f} ({sel.sum()})" if sel.any() else "-"   # noqa: E731
    return rows, [f"| {path} | {med(~y)} | {med(y)} | {med(u)} | {med(~u)} |"], (sc, u)


def table(caption, text, numbers, rows):
    """A markdown table under its caption: the text columns, then the number columns (right-aligned)."""
    rule = "|" + "---|" * (text.count("|") + 1) + "---:|" * (numbers.count("|") + 1)
    return "\n".join([f"\n{caption}\n", f"| {text} | {numbers} |", rule, *rows])


def main(cfg):
    paths = [p for p in cfg.ckpts.split(",") if p]
    for flag, path in [("md", cfg.md), ("picture", cfg.picture)] + [("scores", scores_path(cfg, p)) for p in paths if cfg.scores]:
        check_file(flag, path)                                   # every check before any work
    device = pick_device(cfg.device, precision=cfg.precision)
    if not paths and cfg.probe != "band":
        raise BadInput("--ckpts names no checkpoint")
    models = [load_generator(p, device) for p in paths]
    W = models[0].stream["window"] if models else 8
    cfg.lengths, cfg.after = cfg.lengths or f"{W},{2 * W},{4 * W}", cfg.after or 4 * W
    lengths = [int(v) if v.strip().isdigit() else 0 for v in cfg.lengths.split(",")]   # 0: not a length
    for g in models:
        if any(L < g.chunk or L % g.chunk for L in lengths) or cfg.after % g.chunk:
            raise BadInput(f"--lengths={cfg.lengths} and --after={cfg.after} must be positive multiples of the chunk ({g.chunk})")
    policies, known = [p for p in cfg.policies.split(",") if p], SwitchCache.__metadata__[0].choices   # config.py's list
    if not policies or any(p not in known for p in policies):
        raise BadInput(f"--policies={cfg.policies!r}: each one of {', '.join(known)}")
    sigmas = [float(v) for v in cfg.sigmas.split(",")]             # checked by the config (BandLevels)
    tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py") if cfg.probe not in ("videos", "curve") else None
    teacher = build(tck["model_args"], tck["ema"], device).eval() if tck else None
    seeds = f"seeds {cfg.first_seed}-{cfg.first_seed + cfg.seeds - 1}"
    if cfg.probe == "videos":
        text = table(f"**One switch after L frames** ({seeds}, 12 ordered pairs each, {cfg.after} frames after it; mean +- 95% "
                     "interval over seeds; onset: mean frames until the new canonical colour holds, over the n recolours)",
                     "checkpoint | cache at the switch", "L | react | identity | bias | pull | onset (n)",
                     [r for p, g in zip(paths, models) for r in video_rows(cfg, p, g, lengths, policies)])
    elif cfg.probe == "curve":
        cols = " | ".join(f"f = {f}" for f in CURVE_AT if f < cfg.after)
        text = table(f"**Pull frame by frame after one switch** ({seeds}, 12 ordered pairs each; share of the switches whose "
                     "sprite colour at frame f after the switch came 0.2 closer to the new event's colour than before it)",
                     "checkpoint", f"L | {cols} | switches", [r for p, g in zip(paths, models) for r in curve_rows(cfg, p, g, lengths)])
    elif cfg.probe == "verdicts":
        text = table(f"**Colour verdicts of x0 at fixed noise levels** ({seeds}, 12 ordered pairs each; over the frames "
                     "whose sprite is not of their event's canonical colour)", "videos of | net | window", f"sigma | {SHARES}",
                     [r for p, g in zip(paths, models) for r in verdict_rows(cfg, p, g, teacher, sigmas, device)])
    elif cfg.probe == "band":
        text = table(f"**The noise band** ({seeds}, 64 real one-event clips each, the sprite not of the event's colour; "
                     "the teacher's x0 with its DMD guidance)", "teacher", f"sigma | {SHARES}",
                     band_rows(cfg, tck, teacher, sigmas, device))
    else:
        both = [signal_rows(cfg, p, teacher, device) for p in paths]
        if cfg.match_w:                                          # every checkpoint's windows together
            sc = {k: np.concatenate([b[2][0][k] for b in both]) for k in SIGNALS}
            u = np.concatenate([b[2][1] for b in both])          # the floor: windows before their video's first switch
            print("\n".join(f"tau for mean w {cfg.match_w:g}: {k} {tau_for_mean_w(sc[k], np.median(sc[k][u]), cfg.match_w):.5f}"
                            f" (floor {np.median(sc[k][u]):.4f})" for k in SIGNALS if k != "switch"))
        text = table(f"**Which signal tells the training windows apart** (streams {seeds} of 8, {cfg.windows} windows each; "
                     "AUC between windows whose last committed sprite is not of the newest event's canonical colour and "
                     "windows whose sprite is; 95% interval by a bootstrap over streams)",
                     "windows of | signal", "AUC | mismatched / windows", [r for a, _, _ in both for r in a]) + "\n" + \
            table("**The signal's level** (DF (3)'s s, median (windows); before the first switch: the floor's windows)",
                  "windows of", "matched | mismatched | before the first switch | after it", [r for _, b, _ in both for r in b])
    print(text)
    if cfg.md:
        with open(cfg.md, "a") as f:
            f.write(text + "\n")
        print(f"appended the table to {cfg.md}")


if __name__ == "__main__":
    cli(main, DriftConfig, PRESETS)
