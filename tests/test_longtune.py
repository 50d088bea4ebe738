"""Long tuning with switches, the shared cache handling, and sample.py (DESIGN sections 7, 9)."""
import json
import os

import pytest
import torch

import distill
import longtune
import sample
from model import KVCache, load_checkpoint, rollout
from test_distill import LEVELS, distill_cfg, teacher_dir  # noqa: F401  (module fixture)
from test_model import CH, randomized
from test_teacher import assert_one_line_error, run


def test_random_schedule_switches_on_chunk_boundaries():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ev = longtune.random_schedule(4, 64, 2, 8, 3, gen)
        changes = (ev[:, 1:] != ev[:, :-1]).any(0).nonzero().flatten() + 1   # frames where some video switches
        assert 1 <= len(changes) <= 3 and all(c % 2 == 0 and c >= 8 for c in changes.tolist())
        assert ((ev[:, changes] != ev[:, changes - 1]).all())                # every video really switches


def stream_with_switch(m, switch, pieces=(8, 6, 6)):
    torch.manual_seed(0)
    T = sum(pieces)
    noise = torch.randn(2, T, 3, 16, 16)
    ev = torch.zeros(2, T, dtype=torch.long)
    ev[:, 10:] = torch.tensor([3, 1])[:, None]                   # both videos switch at frame 10
    cache, outs, i = KVCache(2, 6), [], 0
    torch.manual_seed(1)
    for n in pieces:
        outs.append(rollout(m, noise[:, i:i + n], ev[:, i:i + n], LEVELS, CH, cache, switch=switch))
        i += n
    return torch.cat(outs, 1), cache


def test_pieces_equal_one_stream_and_switch_modes_differ():
    m = randomized()
    with torch.no_grad():
        whole, _ = stream_with_switch(m, "recache", pieces=(20,))
        parts, c_re = stream_with_switch(m, "recache")          # how longtune's persistent state advances
        keep, c_keep = stream_with_switch(m, "keep")
        clear, c_clear = stream_with_switch(m, "clear")
    assert torch.equal(whole, parts)                             # training pieces = one inference stream
    assert torch.equal(parts[:, :10], keep[:, :10]) and torch.equal(parts[:, :10], clear[:, :10])
    assert (parts[:, 10:] - keep[:, 10:]).abs().max() > 1e-3     # recache changed what the new chunk sees
    assert (clear[:, 10:] - keep[:, 10:]).abs().max() > 1e-3
    assert (c_re.ordered()[1] == torch.tensor([3, 1])[:, None]).all()  # the whole cache, sink included, is re-encoded
    assert (c_keep.ordered()[1][:, :2] == 0).all()                     # keep leaves the sink under the old event
    assert c_clear.n_seen == 20 - 10 and len(c_re) == len(c_keep) == 8   # clear dropped everything before the switch


def test_cache_stays_bounded_over_a_10x_window_stream():
    m = randomized()
    cache = KVCache(2, 4)
    with torch.no_grad():
        rollout(m, torch.randn(1, 60, 3, 16, 16), torch.zeros(1, 60, dtype=torch.long), LEVELS, CH, cache)
    assert cache.n_seen == 60 and len(cache) == 6 and cache.kv.shape[4] == 6


def test_streams_use_the_inference_rollout(teacher_dir):  # noqa: F811
    """Longtune's persistent rollout state generates exactly what the shared rollout generates."""
    m = randomized()
    cfg = longtune.LongtuneConfig(batch=2, windows=3, context=2)
    cfg.chunk, cfg.n_sink, cfg.n_window = 2, 2, 8
    tcfg = dict(frames=8, size=16)
    s = longtune.Streams(cfg, tcfg, torch.Generator().manual_seed(0), "cpu")
    ev = s.events.clone()
    with torch.no_grad():
        torch.manual_seed(5)
        w1, e1, mask1, _ = s.advance(m, LEVELS, exit_step=3)
        w2, e2, mask2, _ = s.advance(m, LEVELS, exit_step=3)
        torch.manual_seed(5)
        cache = KVCache(2, 8)
        r1 = rollout(m, torch.randn(2, 8, 3, 16, 16), ev[:, :8], LEVELS, 2, cache)
        r2 = rollout(m, torch.randn(2, 6, 3, 16, 16), ev[:, 8:14], LEVELS, 2, cache)
    assert torch.equal(w1, r1) and mask1.all()
    assert torch.equal(w2[:, 2:], r2) and torch.equal(w2[:, :2], r1[:, -2:])   # K context frames + F new
    assert mask2.tolist() == [False, False] + [True] * 6
    assert torch.equal(e2, ev[:, 13])                            # the window's current event


@pytest.fixture(scope="module")
def student_dir(teacher_dir):  # noqa: F811
    distill.main(distill_cfg(teacher_dir, max_steps=1))
    return teacher_dir


def test_longtune_end_to_end(student_dir):
    cfg = longtune.LongtuneConfig(out_dir=str(student_dir), max_steps=2, batch=2, critic_ratio=2, windows=2, log_every=1)
    longtune.main(cfg)
    ck = load_checkpoint(str(student_dir / "longtune.pt"), ["longtune"], "")
    assert ck["step"] == 2


def test_sample_eval_json_and_same_seed(student_dir, tmp_path):
    st = str(student_dir / "student.pt")
    cfg = sample.SampleConfig(eval=True, ckpts=f"{st},{st}", seeds=2, json=str(tmp_path / "e.json"),
                              schedule_file=str(tmp_path / "s.json"), frames=8, md=str(tmp_path / "r.md"))
    (tmp_path / "s.json").write_text(json.dumps(["right@0,up@4", "down@0"]))
    res = sample.main(cfg)
    data = json.load(open(tmp_path / "e.json"))
    for k in sample.METRICS:
        assert k in data["results"][st]["all"]
    assert res[st]["all"]["valid"]["mean"] >= 0
    md = (tmp_path / "r.md").read_text()
    assert "| checkpoint | follow |" in md and f"| {st} | " in md       # the README's table, written by the run
    model, g = sample.load_generator(st, "cpu")
    ev = sample.schedule_tensor("right@0,up@4", 8, 2, 1, "cpu")
    a, _ = sample.generate(model, g, ev, [7], "recache")
    b, _ = sample.generate(model, g, ev, [7], "recache")
    c, _ = sample.generate(model, g, ev, [8], "recache")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_writes_gif_and_png(student_dir, tmp_path, capsys):
    out = str(tmp_path / "v.gif")
    sample.main(sample.SampleConfig(ckpt=str(student_dir / "student.pt"), events="right@0,up@4", frames=8, out=out))
    assert os.path.exists(out) and os.path.exists(tmp_path / "v.png")
    assert "frames/s" in capsys.readouterr().out


@pytest.mark.parametrize("args,words", [
    (["--events=fly@0"], ["unknown event"]),
    (["--events=right@0,up"], ["malformed"]),
    (["--events=right@0,up@40", "--frames=16"], ["past the end"]),
    (["--frames=0"], ["positive"]),
    (["--out=/proc/forbidden/x.gif", "--frames=4", "--events=right@0"], ["cannot write"]),
])
def test_sample_bad_input(student_dir, args, words):
    r = run("sample.py", f"--ckpt={student_dir / 'student.pt'}", *args)
    assert_one_line_error(r, *words)


def test_sample_wrong_stage(student_dir):
    assert_one_line_error(run("sample.py", f"--ckpt={student_dir / 'teacher.pt'}"), "teacher checkpoint", "python distill.py")
