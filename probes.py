"""Two probes of the mechanism behind reactivity, on trained checkpoints.

    python probes.py --teacher=out/teacher.pt --student=out/student.pt

teacher probe: the bidirectional teacher sees a clean clip moving one way for the first half of
  its window (inpainted: those frames are replaced by the real ones, re-noised to the current
  level, at every Euler step) and the new event's label for the rest. Does it turn?
generator probe: the causal generator gets a real clip moving one way written into its KV cache
  (clean, under the old event), then generates the next chunk under the new event. Does it turn
  within that chunk, and with which cache handling at the switch?
Both count "turned" as world.turned does for the `react` metric, over every ordered pair of the
four moving events and --seeds seeds.
identity failures (--failures=CKPTS): how a generator loses the sprite after a switch, over the
  evaluation's built-in schedules and seeds (as `sample.py --eval` draws them): kept; no sprite
  (no valid frame before or after); a new colour or background straight away; or one after a
  dissolve (two or more frames without a valid sprite first).

    python probes.py --failures=out/longtune_s0.pt,out/deltaforcing_s0.pt --first_seed=100 --seeds=16
"""
from collections import Counter
from dataclasses import dataclass

import torch

import sample                                                     # the benchmark's schedules and per-video seeds
import teacher as teacher_stage
from common import BadInput, cli, load_checkpoint, pick_device
from model import KVCache, add_noise, build, cfg_mix, rollout, stream
from world import EVENTS, World, look, sample_videos, segments, switches, track, turned


@dataclass
class ProbeConfig:
    preset: str = "tiny"
    device: str = "auto"
    teacher: str = "out/teacher.pt"
    student: str = "out/student.pt"   # any generator checkpoint (student or long-tuned)
    seeds: int = 4
    seed: int = 0
    failures: str = ""                # comma-separated generators: count how identity fails after switches instead
    first_seed: int = 100             # --failures: evaluation seeds first_seed .. first_seed + seeds - 1


PRESETS = {"tiny": {}, "small": {}}
PAIRS = [(a, b) for a in range(4) for b in range(4) if a != b]    # right, left, down, up: every ordered pair


def real_clips(w, T, seeds, seed):
    """For every pair and seed, a real clip moving with the pair's first event -> x (N,T,...), pairs (N,2)."""
    pairs = torch.tensor([p for p in PAIRS for _ in range(seeds)])
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
    tc, w = tck["config"], World(**tck["world"])
    model = build(tck["model_args"], tck["ema"], device).eval()
    T, K = tc["frames"], tc["frames"] // 2
    x_real, pairs = real_clips(w, T, cfg.seeds, cfg.seed)
    ev = torch.cat([pairs[:, :1].expand(-1, K), pairs[:, 1:].expand(-1, T - K)], 1).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(x_real.shape, generator=gen).to(device)
    ctx, null = x_real[:, :K].to(device), torch.full_like(ev, model.null_event)
    sig = teacher_stage.euler_grid(tc["sample_steps"], tc["sample_shift"]).to(device)
    for i in range(len(sig) - 1):                                 # Euler + CFG, the context inpainted by replacement
        x[:, :K] = add_noise(ctx, torch.randn(ctx.shape, generator=gen).to(device), sig[i].expand(len(x), K))
        s = sig[i].expand(len(x), T)
        v_c, v_u = model(x.repeat(2, 1, 1, 1, 1), s.repeat(2, 1), torch.cat([ev, null])).chunk(2)
        x = x + (sig[i + 1] - sig[i]) * cfg_mix(v_c, v_u, tc["guidance"])
    return turn_rate(x.cpu(), pairs, K, tck["stream"]["chunk"] if "stream" in tck else tc["chunk"], w)


@torch.no_grad()
def generator_probe(gck, cfg, device, switch):
    s, w = gck["stream"], World(**gck["world"])
    model = build(gck["model_args"], gck["ema"], device).eval()
    K, ch = s["window"] - s["chunk"], s["chunk"]                  # history: all but one chunk of a teacher window
    x_real, pairs = real_clips(w, K + ch, cfg.seeds, cfg.seed)
    cache = KVCache(s["n_sink"], s["n_window"])
    old = pairs[:, :1].expand(-1, ch).to(device)
    for i in range(0, K, ch):                                     # the real history, written clean under the old event
        f = x_real[:, i:i + ch].to(device)
        stream(model, f, torch.zeros(f.shape[:2], device=device), old, cache, write=True)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    new = pairs[:, 1:].expand(-1, ch).to(device)
    out = rollout(model, torch.randn(len(pairs), ch, *x_real.shape[2:], generator=gen).to(device), new, s["sigmas"], ch,
                  cache, switch=switch, gen=gen).cpu()
    return turn_rate(torch.cat([x_real[:, :K], out], 1), pairs, K, ch, w)


def failure_kind(tr, before, after):
    """One switch: 'kept', or how the first frame unlike the segment before it came about."""
    ref = look(tr, before)
    bad = [t for t in after if (tr["color_id"][t], tr["bg_id"][t]) != ref]
    if not bad:
        return "kept"
    last_ok = max([t for t in range(before[0], bad[0]) if tr["valid"][t]], default=before[-1])
    what = "background" if tr["bg_id"][bad[0]] != ref[1] else "colour"
    return f"{what} after a dissolve" if bad[0] - last_ok - 1 >= 2 else f"{what} at once"


def identity_failures(path, cfg, device):
    g, c = sample.load_generator(path, device), Counter()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    for _, ev, x in sample.schedule_videos(g, sample.builtin_schedules(g.stream["window"]), seeds, "recache"):
        for v, e in zip(x.cpu(), ev.numpy()):
            tr, sw = track(v, g.world), switches(e)
            for before, after in segments(tr["valid"], sw, len(e)):
                c[failure_kind(tr, before, after) if before and after else "no sprite"] += 1
    return c


def main(cfg):
    if cfg.seeds <= 0:
        raise BadInput(f"--seeds must be positive, not {cfg.seeds}")
    device = pick_device(cfg.device)
    if cfg.failures:
        for path in cfg.failures.split(","):
            c = identity_failures(path, cfg, device)
            n = sum(c.values())
            print(f"{path}: {n} switches | " + " | ".join(f"{k} {v} ({v / n:.2f})" for k, v in sorted(c.items())))
        return
    tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py")
    gck = load_checkpoint(cfg.student, ["student", "longtune"], "python distill.py")
    n = len(PAIRS) * cfg.seeds
    r = teacher_probe(tck, cfg, device)
    print(f"teacher probe ({cfg.teacher}): turned in {round(r * n)}/{n} clips ({r:.2f})")
    for switch in ("recache", "keep", "clear"):
        r = generator_probe(gck, cfg, device, switch)
        print(f"generator probe ({cfg.student}, cache {switch}): turned within one chunk in {round(r * n)}/{n} clips ({r:.2f})")


if __name__ == "__main__":
    cli(main, ProbeConfig, PRESETS)
