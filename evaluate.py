"""The evaluation in one place: the benchmark over schedules and seeds, and the probes.

    python evaluate.py --ckpts=out/student.pt,out/longtune.pt --first_seed=100 --seeds=16 --json=out/eval.json
    python evaluate.py --probe=react --teacher=out/teacher.pt --ckpts=out/student.pt --seeds=4
    python evaluate.py --probe=failures --ckpts=out/longtune_s0.pt,out/deltaforcing_s0.pt --first_seed=100 --seeds=16
    python evaluate.py --probe=clips --ckpts=out/teacher.pt,out/student.pt --first_seed=777 --seeds=8

benchmark (--probe=none): the same videos (schedules x seeds; video seed 1000 j + s for schedule j)
  through every checkpoint, scored with the world's exact metrics; mean +- 95% interval over
  seeds, checkpoints NAME_s<k>.pt pooled into one row NAME over their training seeds.
react: the bidirectional teacher sees a clean clip moving one way for the first half of its
  window (inpainted: those frames are replaced by the real ones, re-noised to the current level,
  at every Euler step) and the new event's label for the rest: does it turn? And each generator
  gets a real clip moving one way written into its KV cache (clean, under the old event), then
  generates the next chunk under the new event: does it turn within that chunk, with each cache
  handling at the switch? "Turned" as world.turned counts it for `react`, over every ordered pair
  of the four moving events and --seeds clips each.
failures: how a generator loses the sprite after a switch, over the benchmark's built-in schedules
  and seeds: kept; no sprite (no valid frame before or after); a new colour or background
  straight away; or one after a dissolve (two or more frames without a valid sprite first).
clips: teacher and generator checkpoints on the teacher's own evaluation clips (16 x --seeds
  one-event and as many switch clips, noise seed --first_seed), scored as teacher.py and
  distill.py score them at the end of training, which use seed 1234: report on fresh ones.
"""
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import distill
import teacher as teacher_stage
from common import autocast, check_file, load_checkpoint, pick_device
from config import BadInput, Config, Count, OneOf, SwitchCache, Whole, cli
from model import KVCache, add_noise, build, rollout, stream
from sample import check_frames, generate, load_generator, schedule_tensor
from world import (save_strip, batch_metrics, load_world, look, ordered_pairs, parse_schedule, sample_videos, segments, switches, track,
                   turned)

METRICS = ["react", "latency", "follow", "identity", "bias", "pull", "jumps", "valid", "drift"]


@dataclass
class EvalConfig(Config):
    ckpts: str = "out/longtune.pt"  # comma-separated generator checkpoints, one row (or pooled row) each
    probe: OneOf("none", "react", "failures", "clips") = "none"   # none: the benchmark | react | failures | clips (see the top)
    teacher: str = "out/teacher.pt"   # --probe=react and clips: the teacher checkpoint
    weights: OneOf("ema", "model") = "ema"   # ema | model (the raw weights)
    schedule_file: str = ""        # a JSON list of schedule strings, each --frames long (default: the built-in set)
    frames: Count = 96             # --schedule_file: the length of its videos
    seeds: Count = 8               # evaluation seeds (--probe=react: clips per ordered pair)
    first_seed: Whole = 0          # seeds first_seed .. first_seed + seeds - 1 (tune on some, report on fresh ones)
    pool: bool = True              # pool checkpoints named NAME_s<k>.pt (training seeds) into one row NAME
    switch_cache: SwitchCache = "recache_window"   # at every event switch: recache_window | recache | keep | clear
    json: str = ""                 # also write the results here, as JSON
    md: str = ""                   # also append the markdown tables to this file
    png: str = ""                  # also draw the frontier: react against identity failures and pull, a dot per row


PRESETS = {"tiny": {}, "small": {}}


# ----------------------------------------------------------------------------- the benchmark

def builtin_schedules(W):
    """(group, schedule, frames) in units of the teacher window W: one switch, several, long
    horizons, switches off the chunk grid, and rapid switching."""
    one = [("right", "up"), ("down", "left"), ("left", "down"), ("up", "right")]
    return ([("switch", f"{a}@0,{b}@{2 * W}", 4 * W) for a, b in one]
            + [("multi", f"right@0,down@{W + W // 2},left@{3 * W},up@{4 * W + W // 2}", 6 * W),
               ("multi", f"up@0,left@{W},down@{2 * W},right@{3 * W},stay@{4 * W}", 6 * W)]
            + [("long", f"left@0,up@{3 * W},right@{6 * W}", 8 * W), ("long", f"down@0,right@{4 * W}", 8 * W),
               ("long", "right@0", 8 * W)]
            + [("offgrid", f"down@0,right@{2 * W - 3},up@{3 * W + 1}", 4 * W),
               ("offgrid", f"up@0,left@{W + 1},down@{3 * W - 1}", 4 * W)]
            + [("rapid", f"right@0,up@{2 * W},left@{2 * W + 4},down@{2 * W + 8},right@{2 * W + 12}", 4 * W),
               ("rapid", f"left@0,down@{W},right@{W + 4},up@{W + 8},left@{W + 12}", 3 * W)])


def eval_schedules(cfg, W):
    """The schedules of an evaluation: --schedule_file's, or the built-in set."""
    if not cfg.schedule_file:
        return builtin_schedules(W)
    try:
        items = json.load(open(cfg.schedule_file))
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read --schedule_file {cfg.schedule_file}: {e}") from None
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise BadInput(f"--schedule_file {cfg.schedule_file} must hold a non-empty JSON list of schedule strings")
    return [("file", s, cfg.frames) for s in items]


def check_eval(cfg, gens, schedules):
    """Every check of an evaluation, before any work."""
    check_file("json", cfg.json)
    check_file("md", cfg.md)
    check_file("png", cfg.png)
    for _, s, n in schedules:
        check_frames(n, gens[0].chunk)
        parse_schedule(s, n)


def schedule_videos(g, schedules, seeds, switch):
    """Every schedule x seed through one generator, video seed 1000 j + s for schedule j
    -> yields (group, events (B,T) on the CPU, videos (B,T,...))."""
    for j, (group, text, n) in enumerate(schedules):
        ev = schedule_tensor(text, n, g.chunk, len(seeds), "cpu")
        x, _ = generate(g, ev, [1000 * j + s for s in seeds], switch)
        yield group, ev, x


def score(g, schedules, seeds, switch):
    """Every schedule x seed through one generator -> {(group, metric): (schedules, seeds) values}."""
    per = {}
    for group, ev, x in schedule_videos(g, schedules, seeds, switch):
        m = batch_metrics(x, ev, g.world, first=g.chunk, chunk=g.chunk)
        for k in METRICS + ["n_react"]:
            for grp in (group, "all"):
                per.setdefault((grp, k), []).append(m[k])
    return per


def interval(vals):
    """vals (schedules, seeds): mean over a seed's schedules, then mean +- 95% interval over seeds."""
    with warnings.catch_warnings():                              # a metric that applies to none of a seed's videos is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanmean(np.array(vals, dtype=float), axis=0)
    v = v[~np.isnan(v)]
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half))


def markdown(result, seeds, switch):
    lines = []
    for grp in next(iter(result.values())):
        lines += [f"\n**{grp} schedules** (seeds {seeds[0]}-{seeds[-1]}, switch cache {switch}; mean +- 95% interval "
                  f"over seeds, pooled over the training seeds of a row; latency over the n switches that reacted)\n",
                  "| checkpoint | " + " | ".join(METRICS) + " | n |", "|---|" + "---:|" * (len(METRICS) + 1)]
        lines += [f"| {p} | " + " | ".join(f"{r[grp][k]['mean']:.3f} +- {r[grp][k]['ci95']:.3f}" for k in METRICS)
                  + f" | {r[grp]['n_react']['total']:.0f} |" for p, r in result.items()]
    return "\n".join(lines)


def benchmark(cfg, paths, gens):
    schedules = eval_schedules(cfg, gens[0].stream["window"])
    check_eval(cfg, gens, schedules)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    pooled = {}                                                  # row -> (group, metric) -> [(schedules, seeds)]
    for path, g in zip(paths, gens):
        row = re.sub(r"_s\d+(\.pt)$", r"\1", path) if cfg.pool else path   # NAME_s1.pt -> NAME.pt
        for key, vals in score(g, schedules, seeds, cfg.switch_cache).items():
            pooled.setdefault(row, {}).setdefault(key, []).append(np.array(vals, dtype=float))
    result = {row: {} for row in pooled}
    for row, per in pooled.items():
        for (grp, k), vals in per.items():
            vals = np.concatenate(vals, axis=1)                  # (schedules, seeds x training seeds)
            result[row].setdefault(grp, {})[k] = interval(vals) if k != "n_react" else dict(total=float(np.nansum(vals)))
    text = markdown(result, seeds, cfg.switch_cache)
    print(text)
    if cfg.md:
        with open(cfg.md, "a") as f:                             # appends: one file can collect several runs
            f.write(text + "\n")
        print(f"appended the tables to {cfg.md}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(schedules=schedules, seeds=seeds, results=result), f, indent=1)
        print(f"wrote {cfg.json}")
    if cfg.png:
        frontier_png(cfg.png, result)
        print(f"wrote {cfg.png}: " + ", ".join(f"{r} {c}" for r, c in zip(result, DOT_NAMES)))
    return result


DOTS = torch.tensor([[1., 1, 1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1], [0, 0, 0]])
DOT_NAMES = ["white", "red", "yellow", "green", "cyan", "blue", "magenta", "grey"]


def frontier_png(path, result, group="all", size=96):
    """Two panels, react (y, 0.8 to 1) against identity failures 1 - identity and against pull (x, 0 to 0.6):
    a 5-pixel dot per row, in DOT_NAMES order, its x interval (95%) as a whisker; grid every 0.05 / 0.1."""
    img = torch.full((3, size, 2 * size + 4), -0.8)
    for panel, key in enumerate(("identity", "pull")):
        x0 = panel * (size + 4)
        for v in (0.85, 0.9, 0.95):                              # grid: react every 0.05, x every 0.1
            img[:, size - 1 - round((v - 0.8) / 0.2 * (size - 1)), x0:x0 + size] = -0.5
        for v in (0.1, 0.2, 0.3, 0.4, 0.5):
            img[:, :, x0 + round(v / 0.6 * (size - 1))] = -0.5
        for i, r in enumerate(result.values()):
            m = r[group]
            x = (1 - m[key]["mean"]) if key == "identity" else m[key]["mean"]
            if not math.isfinite(x) or not math.isfinite(m["react"]["mean"]):
                continue                                         # a row without a value has no dot
            ci = m[key]["ci95"] if math.isfinite(m[key]["ci95"]) else 0.0   # one seed: no interval
            px = x0 + round(min(max(x / 0.6, 0), 1) * (size - 1))
            py = size - 1 - round(min(max((m["react"]["mean"] - 0.8) / 0.2, 0), 1) * (size - 1))
            half = round(ci / 0.6 * (size - 1))
            img[:, py, max(px - half, x0):min(px + half, x0 + size - 1) + 1] = DOTS[i % len(DOTS), :, None]
            img[:, max(py - 2, 0):py + 3, max(px - 2, x0):px + 3] = DOTS[i % len(DOTS), :, None, None]
    save_strip(path, img[None, None], scale=3)


# ----------------------------------------------------------------------------- the probes

def real_clips(w, T, seeds, seed):
    """For every moving pair and seed, a real clip moving with the pair's first event -> x (N,T,...), pairs (N,2)."""
    pairs = torch.tensor([p for p in ordered_pairs(4) for _ in range(seeds)])
    x, _, _ = sample_videos(w, pairs[:, :1].expand(-1, T), torch.Generator().manual_seed(seed), rho=None)
    return x, pairs


def turn_rate(video, pairs, t0, n, w):
    """Share of videos whose tracked displacement over frames t0..t0+n-1 turned from old to new."""
    hits = []
    for v, (old, new) in zip(video, pairs.tolist()):
        tr = track(v, w)
        d = (tr["pos"][t0:t0 + n] - tr["pos"][t0 - 1:t0 + n - 1] + w.size / 2) % w.size - w.size / 2
        ok = tr["valid"][t0:t0 + n] & tr["valid"][t0 - 1:t0 + n - 1]
        hits.append(turned(d[ok], old, new, w.speed))
    return sum(hits) / len(hits)


@torch.no_grad()
def teacher_probe(tck, cfg, device):
    tc, w = tck["config"], load_world(tck["world"])
    model = build(tck["model_args"], tck["ema"], device).eval()   # the teacher's EMA weights, as every stage uses
    T, H = tc["frames"], tc["frames"] // 2                        # H frames of real history, inpainted
    x_real, pairs = real_clips(w, T, cfg.seeds, cfg.seed)
    ev = torch.cat([pairs[:, :1].expand(-1, H), pairs[:, 1:].expand(-1, T - H)], 1).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x, ctx = torch.randn(x_real.shape, generator=gen).to(device), x_real[:, :H].to(device)
    sig = teacher_stage.euler_grid(tc["sample_steps"], tc["sample_shift"]).to(device)
    for i in range(len(sig) - 1):                                 # Euler + CFG, the context inpainted by replacement
        x[:, :H] = add_noise(ctx, torch.randn(ctx.shape, generator=gen).to(device), sig[i].expand(len(x), H))
        with autocast(device):
            x = teacher_stage.sample(model, ev, x, sig[i:i + 2], tc["guidance"]).float()
    return turn_rate(x.cpu(), pairs, H, tc["chunk"], w)


@torch.no_grad()
def generator_probe(gck, cfg, device, switch):
    s, w = gck["stream"], load_world(gck["world"])
    model = build(gck["model_args"], gck[cfg.weights], device).eval()
    H, ch = s["window"] - s["chunk"], s["chunk"]                  # history: all but one chunk of a teacher window
    x_real, pairs = real_clips(w, H + ch, cfg.seeds, cfg.seed)
    cache = KVCache(s["n_sink"], s["n_window"])
    old = pairs[:, :1].expand(-1, ch).to(device)
    with autocast(device):
        for i in range(0, H, ch):                                 # the real history, written clean under the old event
            f = x_real[:, i:i + ch].to(device)
            stream(model, f, torch.zeros(f.shape[:2], device=device), old, cache, write=True)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        new = pairs[:, 1:].expand(-1, ch).to(device)
        out = rollout(model, torch.randn(len(pairs), ch, *x_real.shape[2:], generator=gen).to(device), new, s["sigmas"],
                      ch, cache, switch=switch, gen=gen).float().cpu()
    return turn_rate(torch.cat([x_real[:, :H], out], 1), pairs, H, ch, w)


@torch.no_grad()
def clip_probe(path, tck, cfg, device):
    """One checkpoint, teacher or generator, on the teacher's evaluation clips -> metrics."""
    ck = load_checkpoint(path, ["teacher", "student", "longtune"], "python teacher.py")
    model, n = build(ck["model_args"], ck[cfg.weights], device).eval(), 16 * cfg.seeds
    if ck["stage"] == "teacher":
        return teacher_stage.evaluate(model, teacher_stage.saved_config(ck), n, device, cfg.first_seed)[0]
    return distill.evaluate(model, ck["stream"], tck, n, device, cfg.first_seed)[0]


def failure_kind(tr, before, after):
    """One switch: 'kept', or how the first frame unlike the segment before it came about."""
    ref = look(tr, before)
    bad = [t for t in after if (tr["color_id"][t], tr["bg_id"][t]) != ref]
    if not bad:
        return "kept"
    last_ok = max([t for t in range(before[0], bad[0]) if tr["valid"][t]], default=before[-1])
    what = "background" if tr["bg_id"][bad[0]] != ref[1] else "colour"
    return f"{what} after a dissolve" if bad[0] - last_ok - 1 >= 2 else f"{what} at once"


def identity_failures(g, cfg):
    c, seeds = Counter(), list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    for _, ev, x in schedule_videos(g, builtin_schedules(g.stream["window"]), seeds, cfg.switch_cache):
        for v, e in zip(x, ev.numpy()):
            tr, sw = track(v, g.world), switches(e)
            for before, after in segments(tr["valid"], sw, len(e)):
                c[failure_kind(tr, before, after) if before and after else "no sprite"] += 1
    return c


def main(cfg):
    device = pick_device(cfg.device, precision=cfg.precision)
    paths = [p for p in cfg.ckpts.split(",") if p]
    if not paths:
        raise BadInput("--ckpts names no checkpoint")
    if cfg.probe != "none" and (cfg.json or cfg.md or cfg.schedule_file or cfg.png):
        raise BadInput(f"--json, --md, --png and --schedule_file belong to the benchmark, not to --probe={cfg.probe}")
    if cfg.probe == "react":
        tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
        gcks = [load_checkpoint(p, ["student", "longtune"], "python distill.py") for p in paths]
        n = len(ordered_pairs(4)) * cfg.seeds
        r = teacher_probe(tck, cfg, device)
        print(f"teacher probe ({cfg.teacher}): turned in {round(r * n)}/{n} clips ({r:.2f})")
        for path, gck in zip(paths, gcks):
            for switch in ("recache_window", "recache", "keep", "clear"):
                r = generator_probe(gck, cfg, device, switch)
                print(f"generator probe ({path}, cache {switch}): turned within one chunk in {round(r * n)}/{n} clips ({r:.2f})")
        return
    if cfg.probe == "clips":
        tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
        for path in paths:
            m = clip_probe(path, tck, cfg, device)
            print(f"{path} ({16 * cfg.seeds} + {16 * cfg.seeds} clips, noise seed {cfg.first_seed}): "
                  + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))
        return
    gens = [load_generator(p, device, cfg.weights) for p in paths]
    if cfg.probe == "failures":
        for path, g in zip(paths, gens):
            c = identity_failures(g, cfg)
            n = sum(c.values())
            print(f"{path}: {n} switches | " + " | ".join(f"{k} {v} ({v / n:.2f})" for k, v in sorted(c.items())))
        return
    return benchmark(cfg, paths, gens)


if __name__ == "__main__":
    cli(main, EvalConfig, PRESETS)
