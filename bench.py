"""Speed, measured in one run so that ratios compare like with like (machines are noisy).

    python bench.py                 # tiny on CPU, small on a GPU
    python bench.py --batch=8 --frames=256

Rows: the teacher's Euler + CFG sampler over a full clip against the student streaming 4 steps
per chunk through its KV cache; per-frame cost early against late in a long stream; and cached
streaming against recomputing the whole causal prefix for every chunk. Weights do not change
speed, so untrained models of the preset's shape are used.
"""
import time
from dataclasses import dataclass

import torch

import distill
import teacher
from model import KVCache, build, cli, pick_device, pred_x0, rollout


@dataclass
class BenchConfig:
    preset: str = "tiny"
    device: str = "auto"
    batch: int = 1              # streams generated side by side
    frames: int = 256           # length of the stream for cached streaming against recompute
    late: int = 500             # per-frame cost is measured around frame 50 and around this frame
    repeats: int = 3            # best of n
    threads: int = 0            # torch CPU threads; 0 = torch's default


PRESETS = {"tiny": {}, "small": {}}


def timed(fn, device, repeats):
    """Best wall time of fn() over repeats, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()                             # time the GPU work, not the launch
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def recompute_stream(model, noise, event, levels, chunk):
    """The baseline without a cache: every denoising step re-runs the whole clean causal prefix."""
    done = []
    for i in range(0, noise.shape[1], chunk):
        x = noise[:, i:i + chunk]
        for k in range(len(levels)):
            seq = torch.cat(done + [x], 1)
            sig = torch.zeros(seq.shape[:2], device=x.device)
            sig[:, i:] = levels[k]
            x0 = pred_x0(x, model(seq, sig, event[:, :i + chunk], causal_chunk=chunk)[:, i:], sig[:, i:])
            if k + 1 < len(levels):
                x = (1 - levels[k + 1]) * x0 + levels[k + 1] * torch.randn_like(x0)
        done.append(x0)
    return torch.cat(done, 1)


@torch.no_grad()
def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    tcfg = teacher.TeacherConfig(**teacher.PRESETS[cfg.preset])
    dcfg = distill.DistillConfig(**distill.PRESETS[cfg.preset])
    model = build(tcfg, device=device).eval()
    levels = distill.student_levels(dcfg, device)
    B, T, S, ch = cfg.batch, tcfg.frames, tcfg.size, dcfg.chunk
    n = max(cfg.frames, cfg.late + 20, 70)
    ev = torch.zeros(B, n, dtype=torch.long, device=device)
    noise = torch.randn(B, n, 3, S, S, device=device)
    print(f"device {device}, {torch.get_num_threads()} threads, preset {cfg.preset}, batch {B}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {T}-frame teacher clips, chunk {ch}")
    rows = []

    t_teacher = timed(lambda: teacher.sample(model, ev[:, 0], noise[:, :T], teacher.euler_grid(tcfg.sample_steps),
                                             tcfg.guidance), device, cfg.repeats)
    t_student = timed(lambda: rollout(model, noise[:, :T], ev[:, :T], levels, ch, KVCache(dcfg.n_sink, dcfg.n_window)),
                      device, cfg.repeats)
    t_first = timed(lambda: rollout(model, noise[:, :ch], ev[:, :ch], levels, ch, KVCache(dcfg.n_sink, dcfg.n_window)),
                    device, cfg.repeats)
    rows += [(f"teacher Euler {tcfg.sample_steps} steps + CFG, {T}-frame clip", B * T / t_teacher, "frames/s"),
             (f"student {len(levels)} steps/chunk, KV cache, {T}-frame clip", B * T / t_student, "frames/s"),
             ("speed-up student / teacher", t_teacher / t_student, "x"),
             ("student first-chunk latency", t_first * 1000, "ms")]

    def per_frame_cost(at, n=10):
        """Seconds per frame for n chunks generated after a stream of `at` frames has filled the cache."""
        cache = KVCache(dcfg.n_sink, dcfg.n_window)
        rollout(model, noise[:, :at], ev[:, :at], levels, ch, cache)
        snap = (cache.frames, cache.events, list(cache.kv), cache.n_seen)

        def step():
            cache.frames, cache.events, cache.kv, cache.n_seen = snap[0], snap[1], list(snap[2]), snap[3]
            rollout(model, noise[:, at:at + n * ch], ev[:, at:at + n * ch], levels, ch, cache)
        return timed(step, device, cfg.repeats) / (n * ch)
    early, late = per_frame_cost(50), per_frame_cost(cfg.late)
    rows += [("per-frame cost at frames 50-70", early * 1000, "ms"),
             (f"per-frame cost at frames {cfg.late}-{cfg.late + 20}", late * 1000, "ms"),
             (f"ratio frame {cfg.late} / frame 50", late / early, "x")]

    F = cfg.frames
    t_cache = timed(lambda: rollout(model, noise[:, :F], ev[:, :F], levels, ch, KVCache(dcfg.n_sink, dcfg.n_window)),
                    device, 1)
    t_recompute = timed(lambda: recompute_stream(model, noise[:, :F], ev[:, :F], levels, ch), device, 1)
    rows += [(f"{cfg.frames} frames, cached streaming", cfg.frames * B / t_cache, "frames/s"),
             (f"{cfg.frames} frames, recompute the causal prefix", cfg.frames * B / t_recompute, "frames/s"),
             ("speed-up cache / recompute", t_recompute / t_cache, "x")]

    w = max(len(r[0]) for r in rows)
    print(f"| {'what':<{w}} | value | unit |\n|{'-' * (w + 2)}|---:|---|")
    for name, val, unit in rows:
        print(f"| {name:<{w}} | {val:,.2f} | {unit} |")


if __name__ == "__main__":
    cli(main, BenchConfig, PRESETS)
