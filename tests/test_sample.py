"""sample.py: streaming generation (a video depends only on its own seed, never on its batch),
the --eval benchmark, GIF/PNG output, and one clear line for every bad input."""
import json
import os

import numpy as np
import pytest
import torch

import sample
from conftest import assert_one_line_error, randomized, run, stream_setup
from world import World


def random_generator(**kw):
    return sample.Generator(randomized(), stream_setup(**kw), World())


def test_generator_holds_model_stream_and_world():
    g = random_generator(chunk=2)
    assert g.chunk == 2 and g.world.size == 16 and g.stream["n_window"] == 8


@pytest.mark.parametrize("switch", ["recache", "clear", "keep"])
def test_a_video_does_not_depend_on_its_batch(switch):
    """Video 0 (seed 5) generated alone, and next to another video (seed 9, another schedule, a
    switch at another frame): the same frames. Its noise and re-noising come from its own seed."""
    g = random_generator()
    one = sample.schedule_tensor("right@0,up@4", 8, 2, 1, "cpu")
    two = torch.cat([one, sample.schedule_tensor("down@0,left@2,stay@6", 8, 2, 1, "cpu")])
    a, times = sample.generate(g, one, [5], switch)
    b, _ = sample.generate(g, two, [5, 9], switch)
    assert a.abs().max() > 0.1 and len(times) == 4              # a real, non-zero generator
    assert torch.allclose(a, b[0:1], atol=1e-5), (a - b[0:1]).abs().max()
    assert (b[0] - b[1]).abs().max() > 1e-2
    c, _ = sample.generate(g, one, [6], switch)
    assert (a - c).abs().max() > 1e-2                            # another seed, another video


def test_generate_hands_over_chunks_as_they_come():
    g = random_generator()
    ev = sample.schedule_tensor("right@0", 6, 2, 2, "cpu")
    chunks = []
    x, times = sample.generate(g, ev, [1, 2], "recache", on_chunk=chunks.append)
    assert x is None and len(chunks) == len(times) == 3 and all(c.shape == (2, 2, 3, 16, 16) for c in chunks)
    whole, _ = sample.generate(g, ev, [1, 2], "recache")
    assert torch.equal(torch.cat(chunks, 1), whole)


def test_generate_leaves_the_global_rng_alone():
    g = random_generator()
    state = torch.get_rng_state()
    sample.generate(g, sample.schedule_tensor("right@0,up@2", 4, 2, 1, "cpu"), [3], "recache")
    assert torch.equal(state, torch.get_rng_state())


def test_builtin_schedules_parse_and_fit():
    from world import parse_schedule
    groups = set()
    for group, text, frames in sample.builtin_schedules(8):
        parse_schedule(text, frames)
        assert frames % 2 == 0
        groups.add(group)
    assert groups == {"switch", "multi", "long", "offgrid", "rapid"}


def test_interval_ignores_nan_and_gives_a_95_percent_half_width():
    vals = [[1.0, 2.0, float("nan")], [3.0, float("nan"), float("nan")]]   # (schedules, seeds)
    r = sample.interval(vals)
    assert r["mean"] == pytest.approx(np.mean([2.0, 2.0]))      # seed 2 applies to nothing: dropped
    assert r["ci95"] == pytest.approx(0.0)
    assert np.isnan(sample.interval([[1.0]])["ci95"])


def test_score_and_markdown():
    g = random_generator()
    per = sample.score(g, [("switch", "right@0,up@4", 8)], [0, 1], "recache")
    for k in sample.METRICS + ["n_react"]:
        assert len(per[("switch", k)]) == 1 and len(per[("all", k)][0]) == 2
    result = {"x.pt": {grp: {k: (sample.interval(per[(grp, k)]) if k != "n_react" else dict(total=1.0))
                             for k in sample.METRICS + ["n_react"]} for grp in ("switch", "all")}}
    md = sample.markdown(result, [0, 1], "recache")
    assert "**switch schedules**" in md and "| x.pt | " in md and "| checkpoint | react |" in md


def test_sample_eval_json_and_same_seed(student_dir, tmp_path):
    st = str(student_dir / "student.pt")
    cfg = sample.SampleConfig(eval=True, ckpts=f"{st},{st}", seeds=2, json=str(tmp_path / "e.json"),
                              schedule_file=str(tmp_path / "s.json"), frames=8, md=str(tmp_path / "r.md"))
    (tmp_path / "s.json").write_text(json.dumps(["right@0,up@4", "down@0"]))
    res = sample.main(cfg)
    data = json.load(open(tmp_path / "e.json"))
    for k in sample.METRICS:
        assert k in data["results"][st]["all"]
    assert res[st]["all"]["valid"]["mean"] >= 0 and "total" in res[st]["all"]["n_react"]
    md = (tmp_path / "r.md").read_text()
    assert "| checkpoint | react |" in md and f"| {st} | " in md        # the README's table, written by the run
    g = sample.load_generator(st, "cpu")
    assert isinstance(g, sample.Generator) and g.chunk == 2
    ev = sample.schedule_tensor("right@0,up@4", 8, 2, 1, "cpu")
    a, _ = sample.generate(g, ev, [7], "recache")
    b, _ = sample.generate(g, ev, [7], "recache")
    c, _ = sample.generate(g, ev, [8], "recache")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_load_generator_weights(student_dir):
    st = str(student_dir / "student.pt")
    ema, raw = sample.load_generator(st, "cpu"), sample.load_generator(st, "cpu", "model")
    ck = torch.load(st, weights_only=True)
    assert all(torch.equal(v, ck["ema"][k]) for k, v in ema.model.state_dict().items())
    assert all(torch.equal(v, ck["model"][k]) for k, v in raw.model.state_dict().items())
    assert ema.stream == ck["stream"] and ema.world == World(**ck["world"])


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


def test_sample_wrong_stage(teacher_dir):
    assert_one_line_error(run("sample.py", f"--ckpt={teacher_dir / 'teacher.pt'}"), "teacher checkpoint", "python distill.py")
