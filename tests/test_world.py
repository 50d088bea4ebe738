"""The tracker and metrics are exact on ground truth, and catch planted failures."""
import pytest
import torch

from model import BadInput
from world import (BACKGROUNDS, CANON, EVENTS, SPRITE_COLORS, World, parse_schedule, sample_videos,
                   schedule_events, teacher_batch, track, video_metrics)

W = World()


def schedule_video(text, frames=24, chunk=2, seed=0):
    ev = schedule_events(parse_schedule(text, frames), frames, chunk)
    x, color, bg = sample_videos(W, ev[None], torch.Generator().manual_seed(seed))
    return x[0], ev


@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_is_perfect(seed):
    x, ev = schedule_video("right@0,down@7,left@12,up@18,stay@21", seed=seed)   # wraps the torus often
    m = video_metrics(x, ev, W, first=2)
    assert m["follow"] == 1 and m["identity"] == 1 and m["jumps"] == 0 and m["valid"] == 1
    assert m["latency"] == 0 and m["drift"] < 1e-6


def test_teacher_clips_are_perfect_and_biased():
    w = World(rho=0.9)
    x, event = teacher_batch(w, 400, 8, torch.Generator().manual_seed(1))
    ms = [video_metrics(v, e.repeat(8), w) for v, e in zip(x, event)]
    assert all(m["follow"] == 1 and m["valid"] == 1 and m["jumps"] == 0 for m in ms)
    canon = torch.tensor([m["canon"] for m, e in zip(ms, event) if CANON[e] >= 0])
    assert abs(canon.mean().item() - (0.9 + 0.1 / 4)) < 0.05    # rho plus the uniform draws that hit canon


def test_switches_snap_to_chunk_boundaries():
    ev = schedule_events(parse_schedule("right@0,up@5,left@8", 12), 12, 4)
    assert ev.tolist() == [0] * 8 + [1] * 4                      # up@5 -> 8, then left@8 overrides at 8
    ev = schedule_events(parse_schedule("right@0,up@3", 8), 8, 2)
    assert ev.tolist() == [0] * 4 + [3] * 4


def test_planted_recolour_lowers_identity():
    x, ev = schedule_video("right@0,up@12")
    tr = track(x, W)
    new = (tr["color_id"][0] + 1) % len(SPRITE_COLORS)
    sprite = (x - BACKGROUNDS[tr["bg_id"][0]][:, None, None]).abs().sum(1, keepdim=True) > 0.1   # (T,1,S,S)
    x2 = torch.where(sprite & (torch.arange(24) >= 16)[:, None, None, None], SPRITE_COLORS[new][:, None, None], x)
    assert video_metrics(x, ev, W)["identity"] == 1
    assert video_metrics(x2, ev, W)["identity"] == 0
    x3 = torch.where(sprite & (torch.arange(24) >= 12)[:, None, None, None], SPRITE_COLORS[1][:, None, None], x)
    assert tr["color_id"][0] != 1                                # red, so green after "up" is the planted bias
    assert video_metrics(x3, ev, W)["bias"] == 1 and video_metrics(x, ev, W)["bias"] == 0


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
