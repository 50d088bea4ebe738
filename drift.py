"""Where drift comes from: the probes behind the conditional-bias question (Delta Forcing sec. 1:
a teacher that is condition-aligned but trajectory-agnostic passes its bias to the generator).

    python drift.py --ckpts=out/student.pt,out/longtune.pt --first_seed=100 --seeds=4
    python drift.py --probe=verdicts --ckpts=out/longtune.pt --first_seed=100 --seeds=4
    python drift.py --probe=band --teacher=out/teacher.pt --picture=out/band.png
    python drift.py --probe=signals --ckpts=out/student.pt,out/longtune.pt --seeds=4

videos: every checkpoint streams one switch, the old event for L frames (--lengths: 1, 2 and 4
  teacher windows), then the new one for --after frames (4 windows), every ordered pair of the four moving events, under each cache policy at
  the switch (--policies: recache_window, the default, the sink keeping its old event as in
  LongLive's inference; recache, the sink relabelled too; keep). Per row: react, identity, the recolour rate toward the new event's canonical
  colour (bias, over the switches whose sprite was not of that colour) and its onset (frames after
  the switch until the sprite holds that colour for two frames in a row). Video seeds are shared
  by every row, so the rows differ in the one thing they name.
verdicts: the teacher's (with the checkpoint's DMD guidance) and the checkpoint's critic's x0 at
  fixed noise levels (--sigmas) on teacher-length windows of the checkpoint's own videos (one
  switch after 2 windows), wholly before, across and wholly after the switch, each frame under its
  own event as long tuning gives them.
band: the teacher alone on real one-event clips whose sprite is not of the event's colour, which
  is what it sees in a window wholly after a switch.
signals: which consistency signal tells the windows long tuning trains on apart (Delta Forcing's
  Eq. 3): the checkpoint's own streams as longtune.py rolls them out, each window scored by every
  candidate, AUC between windows whose last committed sprite is not of the newest event's
  canonical colour and windows whose sprite is (95% interval: bootstrap over windows); then the
  level of Eq. 3's s by kind of window (matched, mismatched, before and after the video's first
  switch), which a fixed tau reads and a ranking does not.
Both count, over the frames whose sprite is not of their event's canonical colour, the x0 frames
that keep the sprite's position (within a pixel), keep its colour, paint it the event's colour,
and keep the position while painting: a range of sigma where the last is high is the noise band
in which the teacher is biased but not blind (in real video, layout outlives identity).
"""
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch

import longtune
import trust_region as tr
from common import autocast, check_file, load_checkpoint, pick_device
from config import BadInput, Config, Count, OneOf, SwitchCache, Whole, cli
from evaluate import interval
from distill import dmd_sigma
from model import add_noise, build, cfg_mix, pred_x0
from sample import generate, load_generator
from world import CANON, load_world, ordered_pairs, sample_videos, save_strip, schedule_events, track, video_metrics


@dataclass
class DriftConfig(Config):
    ckpts: str = "out/student.pt,out/longtune.pt"   # comma-separated generator checkpoints, a block of rows each
    probe: OneOf("videos", "verdicts", "band", "signals") = "videos"   # videos | verdicts | band | signals (top)
    teacher: str = "out/teacher.pt"  # --probe=verdicts and band: the teacher checkpoint
    lengths: str = ""              # frames of the old event before the switch, multiples of the chunk (default: 1, 2, 4 windows)
    after: Whole = 0               # frames of the new event after the switch (default: 4 teacher windows)
    policies: str = "recache_window,recache,keep"   # cache policies at the switch, one row each
    sigmas: str = "0.3,0.5,0.7,0.8,0.9"   # --probe=verdicts and band: the fixed noise levels
    seeds: Count = 4               # video seeds per ordered pair (12 pairs); --probe=signals: stream seeds, 8 streams each
    windows: Count = 40            # --probe=signals: windows per stream seed
    first_seed: Whole = 100        # seeds first_seed .. first_seed + seeds - 1
    picture: str = ""              # --probe=band: a PNG of one clip and the teacher's x0 at each level, 8x
    md: str = ""                   # also append the markdown table to this file


PRESETS = {"tiny": {}, "small": {}}


def numbers(flag, text, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--{flag}={text!r}: expected comma-separated numbers") from None


def check_drift(cfg, gens):
    """Every check before any work."""
    check_file("md", cfg.md)
    check_file("picture", cfg.picture)
    W = gens[0].stream["window"] if gens else 8
    cfg.lengths, cfg.after = cfg.lengths or f"{W},{2 * W},{4 * W}", cfg.after or 4 * W
    lengths, sigmas = numbers("lengths", cfg.lengths, int), numbers("sigmas", cfg.sigmas, float)
    for g in gens:
        if not lengths or any(L < g.chunk or L % g.chunk for L in lengths) or cfg.after % g.chunk:
            raise BadInput(f"--lengths={cfg.lengths} and --after={cfg.after} must be positive multiples of the chunk ({g.chunk})")
    policies = [p for p in cfg.policies.split(",") if p]
    known = get_args(SwitchCache)[1].choices                     # the one list of cache policies (config.py)
    if not policies or any(p not in known for p in policies):
        raise BadInput(f"--policies={cfg.policies!r}: each one of {', '.join(known)}")
    if not sigmas or not all(0 < s < 1 for s in sigmas):
        raise BadInput(f"--sigmas={cfg.sigmas!r}: each level must lie in (0, 1)")
    return lengths, policies, sigmas


def switch_videos(g, L, after, seeds, policy):
    """12 ordered pairs x seeds videos, old event for L frames, the new one for `after`, video seed
    1000 i + s for pair i. -> events (N,T), videos (N,T,...), the pairs (N,2)."""
    pairs = torch.tensor([p for p in ordered_pairs(4) for _ in seeds])          # (N,2) pair-major
    ev = torch.stack([schedule_events([(int(a), 0), (int(b), L)], L + after, g.chunk) for a, b in pairs])
    x, _ = generate(g, ev, [1000 * i + s for i in range(len(ordered_pairs(4))) for s in seeds], policy)
    return ev, x, pairs


def onset(tr, f, new):
    """Frames after the switch at f until the sprite holds the new event's canonical colour for
    two frames in a row (None: it never does)."""
    c, ok = tr["color_id"] == CANON[new], tr["valid"]
    hits = [t for t in range(f, len(c) - 1) if c[t] and c[t + 1] and ok[t] and ok[t + 1]]
    return hits[0] - f if hits else None


def video_rows(cfg, path, g, lengths, policies):
    seeds, rows = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)), []
    for policy in policies:
        for L in lengths:
            ev, x, pairs = switch_videos(g, L, cfg.after, seeds, policy)
            per, onsets = {k: [] for k in ("react", "identity", "bias", "pull")}, []
            for v, e, (_, new) in zip(x, ev, pairs.tolist()):
                m = video_metrics(v, e, g.world, first=g.chunk, chunk=g.chunk)
                for k in per:
                    per[k].append(m[k])
                if m["bias"] == 1.0:
                    onsets.append(onset(track(v, g.world), L, new))
            cell = {k: interval(np.array(vals).reshape(-1, len(seeds))) for k, vals in per.items()}   # (pairs, seeds)
            known = [o for o in onsets if o is not None]
            rows.append(f"| {path} | {policy} | {L} | " + " | ".join(f"{cell[k]['mean']:.3f} +- {cell[k]['ci95']:.3f}"
                        for k in per) + f" | {np.mean(known) if known else float('nan'):.1f} ({len(known)}) |")
    return rows


def kept_and_painted(x0, x, ev, w):
    """Over the frames of x (N,T,...) whose valid sprite is not of its event's canonical colour:
    the share of x0 frames that keep the sprite's position (within a pixel), keep its colour, paint
    it the event's colour, and keep the position while painting it (biased, not blind).
    -> (position, colour, painted, position and painted, frames counted)."""
    hits, n = np.zeros(4), 0
    for a, b, e in zip(x, x0, ev.tolist()):
        ta, tb = track(a, w), track(b, w)
        for t, et in enumerate(e):
            if not ta["valid"][t] or CANON[et] < 0 or ta["color_id"][t] == CANON[et]:
                continue
            d = (tb["pos"][t] - ta["pos"][t] + w.size / 2) % w.size - w.size / 2   # torus distance
            pos, ok = np.abs(d).max() <= 1, tb["valid"][t]
            paint = ok and tb["color_id"][t] == CANON[et]
            hits += [ok and pos, ok and tb["color_id"][t] == ta["color_id"][t], paint, paint and pos]
            n += 1
    return (*(hits / max(n, 1)).tolist(), n)


@torch.no_grad()
def x0_at(net, x, ev, sigma, seed, device, guidance=None):
    """net's x0 prediction from x (N,T,...) noised to one level sigma, noise from `seed`; with
    `guidance`, the teacher's as DMD's real score uses it: cond + g (cond - uncond)."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    s, ev = torch.full(ev.shape, sigma, device=device), ev.to(device)
    xt = add_noise(x.to(device), eps.to(device), s)
    with autocast(device):
        if guidance is None:
            v = net(xt, s, ev).float()
        else:
            v_c, v_u = net(xt.repeat(2, 1, 1, 1, 1), s.repeat(2, 1), torch.cat([ev, torch.full_like(ev, net.null_event)])).chunk(2)
            v = cfg_mix(v_c.float(), v_u.float(), guidance)
    return pred_x0(xt, v, s).cpu()


def row(*cells, r):
    return "| " + " | ".join([*map(str, cells), *(f"{v:.3f}" for v in r[:4]), str(r[4])]) + " |"


def verdict_rows(cfg, path, g, tck, sigmas, device):
    """The teacher's and the critic's verdicts on windows of g's videos: before, across, after a switch."""
    W, seeds = tck["config"]["frames"], list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    teacher = build(tck["model_args"], tck["ema"], device).eval()
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py")
    critic, g_real = build(ck["model_args"], ck["critic"], device).eval(), ck["config"]["guidance"]
    ev, x, _ = switch_videos(g, 2 * W, 2 * W, seeds, "recache_window")
    kinds = {"before": slice(W, 2 * W), "across": slice(2 * W - W // 2, 2 * W + W // 2), "after": slice(3 * W, 4 * W)}
    return [row(path, name, kind, f"{sigma:.2f}", r=kept_and_painted(
                x0_at(net, x[:, s], ev[:, s], sigma, cfg.first_seed, device, gd), x[:, s], ev[:, s], g.world))
            for sigma in sigmas for name, net, gd in (("teacher", teacher, g_real), ("critic", critic, None))
            for kind, s in kinds.items()]


def band_rows(cfg, tck, sigmas, device):
    """The teacher on real one-event clips whose sprite is not of the event's canonical colour: what
    it sees in a window wholly after a switch. 64 clips per seed; --picture: one clip's x0 per level."""
    w, W = load_world(tck["world"]), tck["config"]["frames"]
    teacher, g_real = build(tck["model_args"], tck["ema"], device).eval(), tck["config"]["guidance"]
    ev = torch.arange(64 * cfg.seeds)[:, None].remainder(4).expand(-1, W)        # the four moving events
    x, color, _ = sample_videos(w, ev, torch.Generator().manual_seed(cfg.first_seed))   # uniform colours
    off = torch.tensor(CANON)[ev[:, 0]] != color                                 # not the event's colour
    x, ev, rows, pics = x[off], ev[off], [], [x[off][:1]]
    for sigma in sigmas:
        x0 = x0_at(teacher, x, ev, sigma, cfg.first_seed, device, g_real)
        rows.append(row(cfg.teacher, f"{sigma:.2f}", r=kept_and_painted(x0, x, ev, w)))
        pics.append(x0[:1])
    if cfg.picture:
        save_strip(cfg.picture, torch.cat(pics))                                  # rows: the clip, then x0 per level
    return rows


def auc(score, label, boot=1000):
    """P(a mismatched window scores above a matched one), ties half; 95% interval by bootstrap."""
    def one(s, y):
        a, b = s[y], s[~y]
        if not len(a) or not len(b):
            return float("nan")
        return float(((a[:, None] > b[None]) + 0.5 * (a[:, None] == b[None])).mean())
    rng, n = np.random.default_rng(0), len(score)
    boots = [one(score[i], label[i]) for i in (rng.integers(0, n, n) for _ in range(boot))]
    return one(score, label), *np.percentile(boots, [2.5, 97.5])


@torch.no_grad()
def window_scores(nets, window, ev, K, m, shift, levels):
    """Every candidate signal for a batch of training windows (B,) each, from the committed frames."""
    teacher, critic = nets
    B, Wn = window.shape[:2]
    def x0s(sigma):                                              # teacher with the event, without it, with CFG; the critic
        xt = add_noise(window, torch.randn_like(window), sigma)
        v_c, v_u = teacher(xt.repeat(2, 1, 1, 1, 1), sigma.repeat(2, 1), torch.cat([ev, torch.full_like(ev, teacher.null_event)])).chunk(2)
        tc, tu = pred_x0(xt, v_c.float(), sigma), pred_x0(xt, v_u.float(), sigma)
        return tc, tu, cfg_mix(tc, tu, 1.0), pred_x0(xt, critic(xt, sigma, ev).float(), sigma)
    k = lambda d: tr.frame_norm(d[:, :K]).pow(2).mean(1).sqrt() / m                       # rms over the committed frames
    pooled = lambda d: tr.transition_consistency(d[:, None, :K], m)[0]                    # their per-channel means
    sigma = dmd_sigma(B, shift, window.device)[:, None].expand(B, Wn)
    tc, tu, t, g = x0s(sigma)
    _, _, t5, g5 = x0s(torch.full_like(sigma, 0.5))
    return dict(sigma=sigma[:, 0], k=k(t - g), k_fixed=k(t5 - g5), appearance_D=pooled(t - g), verdict_dmd=pooled(tc - tu),
                verdict_band=tr.transition_consistency(tr.band_verdict(teacher, window, ev, K=K, levels=levels), m)[0])


SIGNALS = {"k": "k = rms(T - G) / m at the DMD level (second reading)", "k_norm": "k per noise level (k / median k of its sigma octile)",
           "k_fixed": "rms(T - G) / m at sigma 0.5 (one more forward)", "appearance_D": "per-channel means of T - G at the DMD level",
           "verdict_dmd": "condition's verdict T^e - T^0, per-channel means, at the DMD level (free)",
           "verdict_band": "condition's verdict, per-channel means, at the band levels (Eq. 3, the default)",
           "switch": "reference: the window holds a switch (the schedule, not a signal)"}


def signal_rows(cfg, path, tck, device):
    """Training windows of `path` as longtune.py streams them; every candidate's AUC."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py")
    lt = longtune.LongtuneConfig(**longtune.PRESETS[cfg.preset])   # the windows of this preset's long tuning
    nets = build(tck["model_args"], tck["ema"], device).eval(), build(ck["model_args"], ck["critic"], device).eval()
    gen_net, w, stream = build(ck["model_args"], ck["ema"], device).eval(), load_world(ck["world"]), ck["stream"]
    scores, labels, fresh = {}, [], []
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        torch.manual_seed(seed)
        streams = longtune.Streams(lt, stream, w.size, torch.Generator().manual_seed(seed), device, 8)
        for _ in range(cfg.windows):
            with torch.no_grad(), autocast(device):
                window, ev, mask, switched = streams.advance(gen_net, stream["sigmas"], int(torch.randint(len(stream["sigmas"]), ())))
                K = int((~mask).sum())
                sc = window_scores(nets, window.float(), ev, K, ck["natural_step"], stream["shift"], longtune.band_levels(lt)) if K else {}
            for b in range(window.shape[0] if K else 0):
                tr_, e = track(window[b, K - 1:K].float(), w), int(ev[b, -1])
                if tr_["valid"][0] and CANON[e] >= 0:
                    labels.append(tr_["color_id"][0] != CANON[e])
                    fresh.append(bool(streams.unswitched[b]))        # no switch yet in its video: longtune.Floor's windows
                    for name, v in [*sc.items(), ("switch", switched.float())]:
                        scores.setdefault(name, []).append(float(v[b]))
    if not labels:
        raise BadInput(f"{path}: no training window has a tracked sprite under an event with a colour (an untrained generator?)")
    sc, y = {k: np.array(v) for k, v in scores.items()}, np.array(labels)
    octile = np.clip(np.searchsorted(np.quantile(sc["sigma"], np.linspace(0, 1, 9)[1:-1]), sc["sigma"]), 0, 7)
    sc["k_norm"] = sc["k"] / np.array([np.median(sc["k"][octile == i]) if (octile == i).any() else 1.0 for i in range(8)])[octile]
    rows = [f"| {path} | {text} | " + "{:.3f} [{:.3f}, {:.3f}]".format(*auc(sc[name], y)) + f" | {y.sum()} / {len(y)} |"
            for name, text in SIGNALS.items()]
    s, u = sc["verdict_band"], np.array(fresh)                  # Eq. 3's s by kind of window: its level, not its ranking
    med = lambda sel: f"{np.median(s[sel]):.4f} ({sel.sum()})" if sel.any() else "-"
    return rows, [f"| {path} | {med(~y)} | {med(y)} | {med(u)} | {med(~u)} |"]


def main(cfg):
    device = pick_device(cfg.device, precision=cfg.precision)
    paths = [p for p in cfg.ckpts.split(",") if p]
    if not paths and cfg.probe != "band":
        raise BadInput("--ckpts names no checkpoint")
    gens = [load_generator(p, device) for p in paths]
    lengths, policies, sigmas = check_drift(cfg, gens)
    seeds = f"seeds {cfg.first_seed}-{cfg.first_seed + cfg.seeds - 1}"
    shares = "keeps position | keeps colour | paints the event's | position and paints | frames |"
    if cfg.probe == "videos":
        head = [f"\n**One switch after L frames** ({seeds}, 12 ordered pairs each; {cfg.after} frames after the switch; "
                "mean +- 95% interval over seeds; onset: mean frames until the new canonical colour holds, over the n "
                "recolours)\n", "| checkpoint | cache at the switch | L | react | identity | bias | pull | onset (n) |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = [r for p, g in zip(paths, gens) for r in video_rows(cfg, p, g, lengths, policies)]
    elif cfg.probe == "verdicts":
        tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
        head = [f"\n**Colour verdicts of x0 at fixed noise levels** ({seeds}, 12 ordered pairs each; over the frames "
                "whose sprite is not of their event's canonical colour)\n", "| videos of | net | window | sigma | " + shares,
                "|---|---|---|---:|" + "---:|" * 5]
        rows = [r for p, g in zip(paths, gens) for r in verdict_rows(cfg, p, g, tck, sigmas, device)]
    elif cfg.probe == "signals":
        tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
        head = [f"\n**Which signal tells the training windows apart** (streams {seeds} of 8, {cfg.windows} windows each, as longtune.py "
                "rolls them out; AUC between windows whose last committed sprite is not of the newest event's canonical colour "
                "and windows whose sprite is; 95% bootstrap interval)\n", "| windows of | signal | AUC | mismatched / windows |",
                "|---|---|---:|---:|"]
        both = [signal_rows(cfg, p, tck, device) for p in paths]
        rows = [r for a, _ in both for r in a] + ["\n**The signal's level** (Eq. 3's s, median (windows); before the first "
                                                  "switch: longtune.Floor's windows)\n", "| windows of | matched | mismatched | "
                                                  "before the first switch | after it |", "|---|---:|---:|---:|---:|"] + \
            [r for _, b in both for r in b]
    else:
        tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
        head = [f"\n**The noise band** ({seeds}, 64 real one-event clips each, the sprite not of the event's colour; "
                "the teacher's x0 with its DMD guidance)\n", "| teacher | sigma | " + shares, "|---|---:|" + "---:|" * 5]
        rows = band_rows(cfg, tck, sigmas, device)
    text = "\n".join(head + rows)
    print(text)
    if cfg.md:
        with open(cfg.md, "a") as f:
            f.write(text + "\n")
        print(f"appended the table to {cfg.md}")


if __name__ == "__main__":
    cli(main, DriftConfig, PRESETS)
