"""evaluate.py: the benchmark (schedules, 95% intervals, JSON and markdown) and the probes (the
identity-failure classification on hand-made tracks; both probes end to end)."""
import json

import numpy as np
import pytest

import evaluate
import sample
from conftest import randomized, stream_setup
from world import World


def test_builtin_schedules_parse_and_fit():
    from world import parse_schedule
    groups = set()
    for group, text, frames in evaluate.builtin_schedules(8):
        parse_schedule(text, frames)
        assert frames % 2 == 0
        groups.add(group)
    assert groups == {"switch", "multi", "long", "offgrid", "rapid"}


def test_interval_ignores_nan_and_gives_a_95_percent_half_width():
    vals = [[1.0, 2.0, float("nan")], [3.0, float("nan"), float("nan")]]   # (schedules, seeds)
    r = evaluate.interval(vals)
    assert r["mean"] == pytest.approx(np.mean([2.0, 2.0]))      # seed 2 applies to nothing: dropped
    assert r["ci95"] == pytest.approx(0.0)
    assert np.isnan(evaluate.interval([[1.0]])["ci95"])


def test_score_and_markdown():
    g = sample.Generator(randomized(), stream_setup(), World())
    per = evaluate.score(g, [("switch", "right@0,up@4", 8)], [0, 1], "recache")
    for k in evaluate.METRICS + ["n_react"]:
        assert len(per[("switch", k)]) == 1 and len(per[("all", k)][0]) == 2
    result = {"x.pt": {grp: {k: (evaluate.interval(per[(grp, k)]) if k != "n_react" else dict(total=1.0))
                             for k in evaluate.METRICS + ["n_react"]} for grp in ("switch", "all")}}
    md = evaluate.markdown(result, [0, 1], "recache")
    assert "**switch schedules**" in md and "| x.pt | " in md and "| checkpoint | react |" in md


def test_benchmark_json_and_markdown(student_dir, tmp_path):
    st = str(student_dir / "student.pt")
    cfg = evaluate.EvalConfig(ckpts=f"{st},{st}", seeds=2, json=str(tmp_path / "e.json"),
                              schedule_file=str(tmp_path / "s.json"), frames=8, md=str(tmp_path / "r.md"))
    (tmp_path / "s.json").write_text(json.dumps(["right@0,up@4", "down@0"]))
    res = evaluate.main(cfg)
    data = json.load(open(tmp_path / "e.json"))
    for k in evaluate.METRICS:
        assert k in data["results"][st]["all"]
    assert res[st]["all"]["valid"]["mean"] >= 0 and "total" in res[st]["all"]["n_react"]
    md = (tmp_path / "r.md").read_text()
    assert "| checkpoint | react |" in md and f"| {st} | " in md        # the README's table, written by the run




def track_of(colors, bg=0):
    """A made-up world.track result: a colour id per frame, -1 for a frame with no valid sprite."""
    c = np.array(colors)
    return dict(valid=c >= 0, color_id=np.maximum(c, 0), bg_id=np.full(len(c), bg))


def kind(colors, f=4):
    tr = track_of(colors)
    before = [t for t in range(f) if tr["valid"][t]]
    after = [t for t in range(f, len(colors)) if tr["valid"][t]]
    return evaluate.failure_kind(tr, before, after)


def test_failure_kinds():
    assert kind([2, 2, 2, 2, 2, -1, 2, 2]) == "kept"                # one dropped frame is not a failure
    assert kind([2, 2, 2, 2, 1, 1, 1, 1]) == "colour at once"
    assert kind([2, 2, 2, 2, -1, -1, 1, 1]) == "colour after a dissolve"
    assert kind([2, 2, 2, 2, -1, 1, 1, 1]) == "colour at once"     # one missing frame is not a dissolve
    tr = track_of([2] * 8)
    tr["bg_id"][5:] = 1
    assert evaluate.failure_kind(tr, [0, 1, 2, 3], [4, 5, 6, 7]) == "background at once"


def test_failures_probe_runs_on_a_generator(student_dir, capsys, monkeypatch):
    # the smoke run's 4-frame window: the rapid schedules do not fit
    monkeypatch.setattr(evaluate, "builtin_schedules", lambda W: [("switch", f"right@0,up@{2 * W}", 4 * W)] * 2)
    evaluate.main(evaluate.EvalConfig(probe="failures", ckpts=str(student_dir / "student.pt"), seeds=1, device="cpu"))
    out = capsys.readouterr().out
    assert "2 switches |" in out, out                            # two schedules x one seed, one switch each


def test_react_probes_run_on_the_teacher_and_a_generator(student_dir, capsys):
    evaluate.main(evaluate.EvalConfig(probe="react", teacher=str(student_dir / "teacher.pt"),
                                      ckpts=str(student_dir / "student.pt"), seeds=1, device="cpu"))
    out = capsys.readouterr().out
    assert "teacher probe" in out and "/12 clips" in out         # 12 ordered pairs of the moving events x 1 clip
    assert all(f"cache {s}): turned within one chunk" in out for s in ("recache", "keep", "clear"))


def test_clips_probe_scores_teacher_and_generator_reproducibly(student_dir, capsys):
    """--probe=clips: both kinds of checkpoint on the teacher's clips; the same seed, the same scores."""
    cfg = dict(probe="clips", teacher=str(student_dir / "teacher.pt"), seeds=1, first_seed=777, device="cpu",
               ckpts=f"{student_dir / 'teacher.pt'},{student_dir / 'student.pt'}")
    outs = []
    for _ in range(2):
        evaluate.main(evaluate.EvalConfig(**cfg))
        outs.append(capsys.readouterr().out)
    lines = outs[0].strip().splitlines()
    assert outs[0] == outs[1] and len(lines) == 2 and all("(16 + 16 clips, noise seed 777): follow" in ln for ln in lines)
