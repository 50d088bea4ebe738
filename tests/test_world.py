"""The world: teacher clips and schedules, and the tracker and metrics, which are exact on ground
truth and catch planted failures (recolour, background change, teleport, no reaction)."""
import math

import numpy as np
import pytest
import torch

from config import BadInput
from metrics import switches, track, video_metrics
from world import BACKGROUNDS, CANON, DIRS, EVENTS, PALETTES, World, natural_step, parse_schedule, random_events, sample_videos, schedule_events, step_sizes, teacher_batch

W = World()


def schedule_video(text, frames=24, chunk=2, seed=0, w=W):
    ev = schedule_events(parse_schedule(text, frames), frames, chunk)
    x, color, bg = sample_videos(w, ev[None], torch.Generator().manual_seed(seed))
    return x[0], ev


def test_world_moves_two_pixels_a_frame():
    assert W.speed == 2
    x, ev = schedule_video("right@0", frames=4)
    pos = track(x, W)["pos"]
    assert np.allclose((np.diff(pos[:, 1]) + 8) % 16 - 8, 2) and np.allclose(np.diff(pos[:, 0]), 0)


@pytest.mark.parametrize("palette", PALETTES)
@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_is_perfect(seed, palette):
    w = World(palette=palette)
    x, ev = schedule_video("right@0,down@7,left@12,up@18,stay@21", seed=seed, w=w)   # wraps the torus often
    m = video_metrics(x, ev, w, first=2)
    assert m["follow"] == 1 and m["identity"] == 1 and m["jumps"] == 0 and m["valid"] == 1
    assert m["latency"] == 0 and m["drift"] < 1e-6
    assert m["react"] == 1 and m["n_react"] == 4                 # every switch, `stay` included, reacted


def test_teacher_clips_are_perfect_and_biased():
    w = World(rho=0.9)
    x, event = teacher_batch(w, 400, 8, torch.Generator().manual_seed(1))
    ms = [video_metrics(v, e, w) for v, e in zip(x, event)]
    assert all(m["follow"] == 1 and m["valid"] == 1 and m["jumps"] == 0 for m in ms)
    canon = torch.tensor([m["canon"] for m, e in zip(ms, event) if CANON[e[0]] >= 0])
    assert abs(canon.mean().item() - (0.9 + 0.1 / 4)) < 0.05    # rho plus the uniform draws that hit canon


def test_teacher_batch_has_per_frame_events_and_about_half_switch_once():
    B, T, chunk = 2000, 8, 2
    x, event = teacher_batch(W, B, T, torch.Generator().manual_seed(0), chunk=chunk, p_switch=0.5)
    assert x.shape == (B, T, 3, W.size, W.size) and event.shape == (B, T) and event.dtype == torch.long
    assert event.min() >= 0 and event.max() < len(EVENTS)
    sw = [switches(e) for e in event]
    assert all(len(s) <= 1 for s in sw)                          # at most one switch per clip
    frac = sum(len(s) == 1 for s in sw) / B
    assert 0.4 < frac < 0.6, frac                                # about half switch
    for s in sw:
        for f, old, new in s:
            assert f % chunk == 0 and 0 < f < T and old != new  # at a chunk boundary, to a different event
    frames = {s[0][0] for s in sw if s}
    assert frames == set(range(chunk, T, chunk))                 # every boundary is used by some clip
    _, never = teacher_batch(W, 50, T, torch.Generator().manual_seed(0), chunk=chunk, p_switch=0.0)
    assert (never == never[:, :1]).all()
    _, always = teacher_batch(W, 50, T, torch.Generator().manual_seed(0), chunk=chunk, p_switch=1.0)
    assert all(len(switches(e)) == 1 for e in always)


def test_teacher_clip_colour_is_the_first_events_canonical_colour():
    w = World(rho=1.0)
    x, event = teacher_batch(w, 300, 8, torch.Generator().manual_seed(2), chunk=2, p_switch=1.0)
    checked = 0
    for v, e in zip(x, event):
        first, last = CANON[e[0]], CANON[e[-1]]
        colour = track(v, w)["color_id"]
        assert (colour == colour[0]).all()                       # the colour never changes within a clip
        if first >= 0:
            assert colour[0] == first
            checked += last >= 0 and last != first              # clips where the last event would say otherwise
    assert checked > 50


def test_random_events_switch_per_video_on_chunk_boundaries():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ev = random_events(4, 64, 2, gen, p_switch=1.0, max_switches=3, first=8)
        assert ev.shape == (4, 64)
        for e in ev:                                             # each video: 1..3 switches, on the grid, after `first`
            changes = (e[1:] != e[:-1]).nonzero().flatten() + 1
            assert 1 <= len(changes) <= 3 and all(c % 2 == 0 and c >= 8 for c in changes.tolist())
            assert (e[changes] != e[changes - 1]).all()          # every switch really changes the event


def test_random_events_draw_switch_frames_per_video():
    ev = random_events(8, 32, 2, torch.Generator().manual_seed(0), p_switch=1.0, max_switches=1)
    at = [(e[1:] != e[:-1]).nonzero().flatten().tolist()[0] + 1 for e in ev]
    assert len(set(at)) >= 2, at                                 # not one switch frame shared by the batch
    assert len({int(e[0]) for e in ev}) >= 2                     # nor one starting event
    default = random_events(200, 8, 2, torch.Generator().manual_seed(0), p_switch=1.0)
    assert all(switches(e)[0][0] >= 2 for e in default)          # by default never inside the first chunk


def test_natural_step_is_a_constant_of_the_data():
    """Drawn from a fixed seed, not a run's: the same for every run, clip length and sample count."""
    m = natural_step(W, 8, 2)
    steps = [float((c - b).norm()) * (2 * 4 * 2) ** 0.5 for c in W.colors for b in BACKGROUNDS]   # one 2-pixel step
    assert min(abs(m - s) for s in steps) < 1e-4 and m == pytest.approx(6.04, abs=0.01)
    assert natural_step(World(palette="saturated"), 8, 2) == pytest.approx(6.79, abs=0.01)
    assert natural_step(W, 4, 2) == m and natural_step(W, 8, 2, n=512) == m
    torch.manual_seed(1)
    state = torch.get_rng_state()
    natural_step(W, 8, 2)
    assert torch.equal(state, torch.get_rng_state())             # and it never moves a run's RNG


def test_switches_snap_to_chunk_boundaries():
    ev = schedule_events(parse_schedule("right@0,up@5,left@8", 12), 12, 4)
    assert ev.tolist() == [0] * 8 + [1] * 4                      # up@5 -> 8, then left@8 overrides at 8
    ev = schedule_events(parse_schedule("right@0,up@3", 8), 8, 2)
    assert ev.tolist() == [0] * 4 + [3] * 4


# ----------------------------------------------------------------------------- react and latency

def test_react_on_ground_truth_switch():
    x, ev = schedule_video("right@0,up@12")
    m = video_metrics(x, ev, W, first=2, chunk=2)
    assert m["react"] == 1 and m["latency"] == 0 and m["n_react"] == 1


def test_no_reaction_when_the_sprite_keeps_its_old_direction():
    x, _ = schedule_video("right@0")                             # keeps going right ...
    _, ev = schedule_video("right@0,up@12")                      # ... although the event says up from frame 12
    m = video_metrics(x, ev, W, first=2, chunk=2)
    assert m["react"] == 0 and m["n_react"] == 0
    assert math.isnan(m["latency"])                              # latency counts only switches that reacted
    assert m["follow"] < 1


def test_latency_averages_only_the_switches_that_reacted():
    _, ev = schedule_video("right@0,up@8,left@16")
    x_up, _ = schedule_video("right@0,up@8")                     # reacts to up, then ignores left
    m = video_metrics(x_up, ev, W, first=2, chunk=2)
    assert m["react"] == 0.5 and m["n_react"] == 1 and m["latency"] == 0


def test_switch_to_stay_reacts_when_the_sprite_stops():
    x, ev = schedule_video("left@0,stay@10")
    m = video_metrics(x, ev, W, first=2, chunk=2)
    assert m["react"] == 1 and m["latency"] == 0
    moving, _ = schedule_video("left@0")
    m = video_metrics(moving, ev, W, first=2, chunk=2)
    assert m["react"] == 0 and math.isnan(m["latency"])


def test_turn_is_judged_on_the_first_chunk_after_the_switch():
    """A sprite that turns one chunk late did not react (react looks at the first chunk only);
    one that turns at once did, even if it moves slower than the event's speed."""
    _, ev = schedule_video("right@0,up@12")
    late, _ = schedule_video("right@0,up@14")
    assert video_metrics(late, ev, W, first=2, chunk=2)["react"] == 0
    slow = World(speed=1)
    xs, _ = schedule_video("right@0,up@12", w=slow)
    assert DIRS[EVENTS.index("up")].tolist() == [-1, 0]
    assert video_metrics(xs, ev, W, first=2, chunk=2)["react"] == 1


def blur(x, shrink=0.9):
    """Roughly a denoiser's x0 at sigma 0.75: a 3x3 circular box blur, then a shrink toward the mean."""
    b = sum(torch.roll(x, (i, j), (-2, -1)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
    mean = x.mean((-2, -1), keepdim=True)
    return mean + shrink * (b - mean)


@pytest.mark.parametrize("palette", PALETTES)
@pytest.mark.parametrize("kind", ["blurred", "noisy"])
def test_tracker_is_exact_on_blurred_and_noisy_frames_of_every_colour(palette, kind):
    """Every sprite colour on every background, at every phase of a 2-pixel step: the tracker's
    colour, background, position (to half a pixel) and validity hold on predictions, not only on
    exact frames. In the band palette colours differ by 0.4 in one or two channels."""
    w, g = World(palette=palette), torch.Generator().manual_seed(0)
    for c in range(4):
        for b in range(len(BACKGROUNDS)):
            x = sample_videos(w, torch.zeros(1, 8, dtype=torch.long), g)[0][0]            # (8,3,S,S) moving right
            truth = track(x, w)
            is_bg = (x - BACKGROUNDS[truth["bg_id"][0]][:, None, None]).abs().sum(1, keepdim=True) < 1e-6
            x = torch.where(is_bg, BACKGROUNDS[b][:, None, None], w.colors[c][:, None, None])
            x = blur(x) if kind == "blurred" else x + 0.1 * torch.randn(x.shape, generator=g)
            tr = track(x, w)
            d = (tr["pos"] - truth["pos"] + w.size / 2) % w.size - w.size / 2
            assert tr["valid"].all() and (tr["color_id"] == c).all() and (tr["bg_id"] == b).all(), (c, b)
            assert np.abs(d).max() <= 0.5, (c, b, d)


def test_band_palette_makes_a_recolour_small_against_a_step():
    band, sat = step_sizes(World(palette="band")), step_sizes(World(palette="saturated"))
    assert band["recolour"] < 0.35 * band["speed 2"] and sat["recolour"] > sat["speed 2"]


# ----------------------------------------------------------------------------- planted failures

def test_planted_recolour_lowers_identity():
    x, ev = schedule_video("right@0,up@12")
    tr = track(x, W)
    new = (tr["color_id"][0] + 1) % len(W.colors)
    sprite = (x - BACKGROUNDS[tr["bg_id"][0]][:, None, None]).abs().sum(1, keepdim=True) > 0.1   # (T,1,S,S)
    x2 = torch.where(sprite & (torch.arange(24) >= 16)[:, None, None, None], W.colors[new][:, None, None], x)
    assert video_metrics(x, ev, W)["identity"] == 1
    assert video_metrics(x2, ev, W)["identity"] == 0
    x3 = torch.where(sprite & (torch.arange(24) >= 12)[:, None, None, None], W.colors[1][:, None, None], x)
    assert tr["color_id"][0] != 1                                # red, so green after "up" is the planted bias
    assert video_metrics(x3, ev, W)["bias"] == 1 and video_metrics(x, ev, W)["bias"] == 0
    assert video_metrics(x3, ev, W)["pull"] == 1 and video_metrics(x, ev, W)["pull"] == 0   # on mean colours too
    half = torch.where(sprite & (torch.arange(24) >= 12)[:, None, None, None], (x + W.colors[1][:, None, None]) / 2, x)
    assert video_metrics(half, ev, W)["pull"] == 1               # half-way to green: no palette entry, still a pull


def test_planted_background_change_lowers_identity():
    x, ev = schedule_video("left@0,down@8")
    x2 = x.clone()
    bg = BACKGROUNDS[track(x, W)["bg_id"][0]]
    other = BACKGROUNDS[(track(x, W)["bg_id"][0] + 1) % len(BACKGROUNDS)]
    is_bg = (x2 - bg[:, None, None]).abs().sum(1, keepdim=True) < 1e-6
    x2 = torch.where(is_bg & (torch.arange(24) >= 10)[:, None, None, None], other[:, None, None], x2)
    assert video_metrics(x2, ev, W)["identity"] == 0


def test_planted_teleport_raises_jumps():
    x, ev = schedule_video("right@0,up@12")
    x2 = x.clone()
    x2[14:] = torch.roll(x[14:], shifts=(6, 5), dims=(-2, -1))   # the sprite teleports at frame 14
    assert video_metrics(x, ev, W)["jumps"] == 0
    m = video_metrics(x2, ev, W)
    assert m["jumps"] > 0 and m["follow"] < 1


def test_blank_and_two_sprite_frames_are_not_valid():
    x, ev = schedule_video("right@0", frames=6)
    x[2] = BACKGROUNDS[0][:, None, None]                         # blank
    x[4] = x[4] + torch.roll(x[4] - x[4].median(), shifts=(8, 8), dims=(-2, -1))   # a second sprite
    tr = track(x.clamp(-1, 1), W)
    assert tr["valid"].tolist() == [True, True, False, True, False, True]
    assert video_metrics(x, ev, W)["valid"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("text,msg", [
    ("jump@0", "unknown event"), ("right@0,up", "malformed"), ("right@3", "start at frame 0"),
    ("right@0,up@x", "non-negative integer"), ("right@0,up@8,left@4", "must increase"),
    ("right@0,up@99", "past the end"), ("", "malformed"),
])
def test_schedule_errors(text, msg):
    with pytest.raises(BadInput, match=msg):
        parse_schedule(text, 48)


def test_schedule_parses():
    assert parse_schedule("right@0, up@24,left@48", 96) == [(0, 0), (3, 24), (1, 48)]
    assert EVENTS[parse_schedule("stay@0", 4)[0][0]] == "stay"


def test_identity_free_on_truth_planted_recolours_and_a_blend():
    """Palette-free identity: continuous colours within FREE of the look before the switch. Ground
    truth keeps it; a full and a half recolour lose it; a sprite painted between two band colours,
    wobbling so that the snapped colour flips frame by frame, keeps it where snapped identity fails."""
    from metrics import FREE
    x, ev = schedule_video("right@0,up@12")
    tr = track(x, W)
    sprite = (x - BACKGROUNDS[tr["bg_id"][0]][:, None, None]).abs().sum(1, keepdim=True) > 0.1   # (T,1,S,S)
    later = sprite & (torch.arange(24) >= 16)[:, None, None, None]
    c0, c1 = W.colors[tr["color_id"][0]], W.colors[(tr["color_id"][0] + 1) % len(W.colors)]
    assert (c1 - c0).norm() > 2 * FREE                            # a half recolour moves more than FREE
    full = torch.where(later, c1[:, None, None], x)
    half = torch.where(later, ((c0 + c1) / 2)[:, None, None], x)
    assert video_metrics(x, ev, W)["identity_free"] == 1
    assert video_metrics(full, ev, W)["identity_free"] == 0 and video_metrics(half, ev, W)["identity_free"] == 0
    wobble = (c0 + c1) / 2 + 0.04 * (c1 - c0) * torch.tensor([1.0, -1.0]).repeat(12)[:, None]   # (24,3) per frame
    blend = torch.where(sprite, wobble[:, :, None, None], x)
    m = video_metrics(blend, ev, W)
    assert len(set(track(blend, W)["color_id"].tolist())) == 2   # the snapped colour flips frame by frame
    assert m["identity"] == 0 and m["identity_free"] == 1
