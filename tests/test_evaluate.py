"""evaluate.py: the benchmark (schedules, 95% intervals, JSON, markdown and the frontier's SVG) and the
probes (the identity-failure classification on hand-made tracks; every probe end to end)."""
import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tools import evaluate, stats
import sample
from conftest import randomized, stream_setup
from config import BadInput, parse_config
from tools.plot import frontier_svg
from world import World

SVG = "{http://www.w3.org/2000/svg}"


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
    r = stats.interval(vals)
    assert r["mean"] == pytest.approx(np.mean([2.0, 2.0]))      # seed 2 applies to nothing: dropped
    assert r["ci95"] == pytest.approx(0.0)
    assert np.isnan(stats.interval([[1.0]])["ci95"])


def test_score_and_markdown():
    g = sample.StreamModel(randomized(), stream_setup(), World())
    per = evaluate.score(g, [("switch", "right@0,up@4", 8), ("drawn", "down@0,left@3", 8)], [0, 1], "recache")
    for k in evaluate.METRICS + ["n_react"]:                        # "all": every schedule but the drawn group
        assert len(per[("switch", k)]) == 1 and len(per[("all", k)]) == 1 and len(per[("all", k)][0]) == 2
        assert len(per[("drawn", k)]) == 1
    result = stats.summarize_rows({"x_s0.pt": per, "x_s1.pt": per}, {"x.pt": ["x_s0.pt", "x_s1.pt"]}, ["x.pt"])
    md = evaluate.markdown(result, [0, 1], "recache", ["x.pt"])
    assert "**switch schedules**" in md and "| **x.pt** | 2 | " in md and "| x_s1.pt | | " in md and "| row | seeds | react |" in md


def test_t_quantile_matches_the_tables():
    assert [round(stats.t_quantile(0.975, d), 3) for d in (1, 2, 4, 10)] == [12.706, 4.303, 2.776, 2.228]
    assert stats.t_quantile(0.975, 10000) == pytest.approx(1.960, abs=1e-3)


def test_rows_are_means_over_training_seeds_and_differences_are_paired():
    """Two methods, three training seeds, the same videos: a row is the mean of its seeds' means with a t
    interval over the three; the paired difference removes what the seeds share (here: everything but 0.1)."""
    def videos(level):                                           # (schedules, evaluation seeds) of one metric
        return {("all", "react"): np.full((2, 4), level), ("all", "n_react"): np.ones((2, 4))}
    shared = [0.5, 0.7, 0.9]                                     # seed-to-seed variation both methods share
    per = {f"a_s{k}.pt": videos(v) for k, v in enumerate(shared)} | {f"b_s{k}.pt": videos(v + 0.1) for k, v in enumerate(shared)}
    rows = {"a.pt": [f"a_s{k}.pt" for k in range(3)], "b.pt": [f"b_s{k}.pt" for k in range(3)]}
    r = stats.summarize_rows(per, rows, ["a.pt", "b.pt"])
    a = r["a.pt"]["all"]["react"]
    assert a["mean"] == pytest.approx(0.7) and a["n"] == 3
    assert a["ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)   # t(0.975, 2) sd / sqrt(n): wide
    assert r["b.pt"]["all"]["react"]["diff"]["a.pt"]["mean"] == pytest.approx(0.1)
    assert r["b.pt"]["all"]["react"]["diff"]["a.pt"]["ci95"] == pytest.approx(0.0, abs=1e-9)   # paired: the shared part cancels
    assert r["a.pt"]["all"]["react"]["diff"]["b.pt"]["mean"] == pytest.approx(-0.1)         # each reference, both ways
    assert "a.pt" not in r["a.pt"]["all"]["react"]["diff"]                                   # never against itself
    r = stats.summarize_rows(per | {"c_s1.pt": videos(0.3)}, rows | {"c.pt": ["c_s1.pt"]}, ["c.pt"])
    assert r["a.pt"]["all"]["react"]["diff"]["c.pt"] == dict(mean=pytest.approx(0.4), ci95=pytest.approx(float("nan"),
                                                                  nan_ok=True), n=1)    # seed 1 only: a seeded reference pairs
    assert a["seeds"]["a_s2.pt"]["mean"] == pytest.approx(0.9) and a["seeds"]["a_s2.pt"]["ci95"] == pytest.approx(0.0)
    with pytest.raises(BadInput, match="--reference=c.pt names no row"):
        stats.summarize_rows(per, rows, ["c.pt"])


def test_merging_parts_gives_the_rows_of_one_evaluation(tmp_path):
    """Parts of a table scored apart (each in its own folder) and merged give exactly the rows of one evaluation
    of every checkpoint; a training seed scored twice is refused, and so are JSONs of other videos."""
    rng = np.random.default_rng(0)
    per = {f"{m}_s{k}.pt": {(g, k): rng.random((2, 4)) for g in ("all", "long") for k in evaluate.METRICS} | {("all", "n_react"): np.ones((2, 4))}
           for m in ("a", "b") for k in range(4)}
    rows = lambda ks: {f"{m}.pt": [f"{m}_s{k}.pt" for k in ks] for m in ("a", "b")}
    whole = stats.summarize_rows(per, rows(range(4)), ["a.pt"])
    parts = [json.loads(json.dumps(stats.summarize_rows({f"p{i}/{p}": v for p, v in per.items()},
                                                        {f"p{i}/{r}": [f"p{i}/{p}" for p in ps] for r, ps in rows(ks).items()}, [])))
             for i, ks in enumerate([(0, 1, 2), (3,)])]                   # one part of 3 seeds, one of 1
    merged = stats.rows_over_seeds(stats.merge(parts), ["a.pt"])
    figures = lambda r: {(row, g, k, x): v for row in r for g in r[row] for k, c in r[row][g].items()
                         for x, v in c.items() if x in ("mean", "ci95", "n", "total")} | {
        (row, g, k, "diff", x): v for row in r for g in r[row] for k, c in r[row][g].items() for x, v in c.get("diff", {}).get("a.pt", {}).items()}
    assert figures(merged) == pytest.approx(figures(whole), nan_ok=True) and len(figures(whole)) == 2 * (2 * 3 * 10 + 1) + 2 * 3 * 10
    with pytest.raises(BadInput, match="training seed 3"):
        stats.merge(parts + parts[1:])
    for i, part in enumerate(parts):
        (tmp_path / f"{i}.json").write_text(json.dumps(dict(schedules=[["all", "x", 8]], seeds=[0, 1, 2, 3], results=part)))
    (tmp_path / "other.json").write_text(json.dumps(dict(schedules=[["all", "x", 8]], seeds=[5, 6, 7, 8], results=parts[1])))
    cfg = evaluate.EvalConfig(merge=f"{tmp_path / '0.json'},{tmp_path / '1.json'}", reference="p0/b.pt", json=str(tmp_path / "m.json"))
    r = evaluate.main(cfg)
    assert r["a.pt"]["all"]["react"]["diff"]["b.pt"]["n"] == 4 and json.loads((tmp_path / "m.json").read_text())["seeds"] == [0, 1, 2, 3]
    with pytest.raises(BadInput, match="other schedules or seeds"):
        evaluate.main(evaluate.EvalConfig(merge=f"{tmp_path / '0.json'},{tmp_path / 'other.json'}"))
    with pytest.raises(BadInput, match="cannot read --merge"):
        evaluate.main(evaluate.EvalConfig(merge=str(tmp_path / "none.json")))


def test_benchmark_json_and_markdown(student_dir, tmp_path):
    for k in (0, 1):                                              # two training seeds of one row x.pt
        shutil.copy(student_dir / "student.pt", tmp_path / f"x_s{k}.pt")
    st = str(tmp_path / "x.pt")
    cfg = evaluate.EvalConfig(ckpts=f"{tmp_path / 'x_s0.pt'},{tmp_path / 'x_s1.pt'}", seeds=2, json=str(tmp_path / "e.json"), svg=str(tmp_path / "f.svg"),
                              schedule_file=str(tmp_path / "s.json"), frames=8, md=str(tmp_path / "r.md"))
    (tmp_path / "s.json").write_text(json.dumps(["right@0,up@4", "down@0"]))
    res = evaluate.main(cfg)
    data = json.load(open(tmp_path / "e.json"))
    for k in evaluate.METRICS:
        assert k in data["results"][st]["all"]
    assert res[st]["all"]["valid"]["mean"] >= 0 and "total" in res[st]["all"]["n_react"]
    md = (tmp_path / "r.md").read_text()
    assert "| row | seeds | react |" in md and f"| **{st}** | 2 | " in md   # two checkpoints of one row
    ET.parse(tmp_path / "f.svg")                                   # the frontier, drawn by the run
    with pytest.raises(BadInput, match="names .*x_s0.pt twice"):
        evaluate.main(evaluate.EvalConfig(ckpts=f"{tmp_path / 'x_s0.pt'},{tmp_path / 'x_s0.pt'}"))


def svg_texts(path):
    root = ET.parse(path).getroot()
    return root, [t.text for t in root.iter(SVG + "text")]


def frontier_row(react, identity, pull, ci=0.02):
    return {"all": {"react": dict(mean=react, ci95=ci), "identity": dict(mean=identity, ci95=ci),
                    "pull": dict(mean=pull, ci95=ci)}}


def test_frontier_svg_has_title_axes_and_row_names_and_skips_a_row_without_a_value(tmp_path):
    nan = float("nan")
    result = {"out/longtune.pt": frontier_row(0.95, 0.4, 0.25), "out/deltaforcing.pt": frontier_row(0.96, 0.6, 0.1, nan),
              "out/empty.pt": frontier_row(nan, nan, nan)}          # one seed: no interval; no value: no point
    frontier_svg(tmp_path / "f.svg", result, note="seeds 100-115")
    root, texts = svg_texts(tmp_path / "f.svg")
    title = root.find(SVG + "title").text
    assert "react against identity failures and pull" in title and title in texts
    assert any("seeds 100-115" in t for t in texts)
    assert {"identity failures (1 - identity)", "pull", "react", "out/longtune.pt", "out/deltaforcing.pt"} <= set(texts)
    assert not any("empty" in t for t in texts) and len(list(root.iter(SVG + "circle"))) == 4   # 2 rows x 2 panels


def test_frontier_svg_names_crowded_rows_in_a_legend(tmp_path):
    result = {f"out/row_{k}.pt": frontier_row(0.95, 0.4, 0.25) for k in range(3)}   # one spot: names would collide
    frontier_svg(tmp_path / "f.svg", result)
    _, texts = svg_texts(tmp_path / "f.svg")
    assert [t for t in texts if "out/row_" in t] == ["1  out/row_0.pt", "2  out/row_1.pt", "3  out/row_2.pt"]
    assert texts.count("1") == 2                                   # the number beside the point, in each panel


def test_the_old_png_flag_is_refused_naming_svg():
    with pytest.raises(BadInput, match="--png was renamed; use --svg"):
        parse_config(evaluate.EvalConfig, evaluate.PRESETS, ["--png=out/frontier.png"])


def track_of(colors, bg=0):
    """A made-up metrics.track result: a colour id per frame, -1 for a frame with no valid sprite."""
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


def test_the_drawn_group_is_fixed_and_covers_every_ordered_pair():
    from world import EVENTS, ordered_pairs, parse_schedule
    a, b = evaluate.drawn_schedules(8), evaluate.drawn_schedules(8)
    assert a == b and len(a) == 20 and all(g == "drawn" and n == 64 for g, _, n in a)   # a fixed rule and seed
    firsts = [tuple(EVENTS.index(item.split("@")[0]) for item in text.split(",")[:2]) for _, text, _ in a]
    assert sorted(firsts) == sorted(ordered_pairs())            # every ordered pair of the five events opens one
    for i, (_, text, n) in enumerate(a):
        parsed = parse_schedule(text, n)
        assert len(parsed) - 1 == 1 + i % 8 and all(e0 != e1 for (e0, _), (e1, _) in zip(parsed, parsed[1:]))
