"""drift.py: the colour verdicts are exact on known frames, the onset is counted from the switch,
and both probes run on a generator checkpoint, with one clear line for bad input."""
import numpy as np
import torch
from conftest import assert_one_line_exit_2, run_cli

from tools import drift
from world import BACKGROUNDS, CANON, World, render


def clip(color, cols, event, w=World()):
    """One clip (1,T,3,S,S) of a sprite of palette colour `color` at columns `cols`, one event."""
    pos = torch.tensor([[[4, c] for c in cols]])
    return render(pos, w.colors[color:color + 1], BACKGROUNDS[:1], w.size, w.sprite), torch.full((1, len(cols)), event)


def test_verdicts_are_exact_on_known_predictions():
    w, right = World(), 0                                        # right's canonical colour is red (0)
    x, ev = clip(2, [0, 2, 4, 6], right)                         # a blue sprite under `right`
    assert drift.kept_and_painted(x, x, ev, w) == (1.0, 1.0, 0.0, 0.0, 4)    # x0 = x: kept, not painted
    painted, _ = clip(CANON[right], [0, 2, 4, 6], right)
    assert drift.kept_and_painted(painted, x, ev, w) == (1.0, 0.0, 1.0, 1.0, 4)   # recoloured in place: biased
    moved, _ = clip(CANON[right], [3, 5, 7, 9], right)
    assert drift.kept_and_painted(moved, x, ev, w)[:4] == (0.0, 0.0, 1.0, 0.0)   # 3 px off and red: blind
    red, ev_red = clip(0, [0, 2], right)
    assert drift.kept_and_painted(red, red, ev_red, w)[4] == 0   # already the event's colour: not counted


def test_onset_counts_frames_until_the_new_colour_holds_twice():
    tr = dict(color_id=np.array([2, 2, 2, 0, 2, 0, 0, 0]), valid=np.ones(8, bool))
    assert drift.onset(tr, 2, 0) == 3                            # frame 3 alone does not hold; 5 and 6 do
    assert drift.onset(dict(color_id=np.full(8, 2), valid=np.ones(8, bool)), 2, 0) is None


def test_video_probe_rows_per_policy_and_length(student_dir, capsys):
    st = str(student_dir / "student.pt")
    drift.main(drift.DriftConfig(ckpts=st, lengths="2,4", after=4, policies="recache,recache_window", seeds=1,
                                 device="cpu"))
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"| {st} |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["recache", "2"], ["recache", "4"], ["recache_window", "2"],
                                                   ["recache_window", "4"]]


def test_verdict_probe_runs_teacher_critic_and_real_clips(student_dir, capsys):
    drift.main(drift.DriftConfig(probe="verdicts", ckpts=str(student_dir / "student.pt"), seeds=1, sigmas="0.5",
                                 teacher=str(student_dir / "teacher.pt"), device="cpu"))
    out = capsys.readouterr().out
    for net, kind in [("teacher", "before"), ("teacher", "after"), ("critic", "across")]:
        assert f"| {net} | {kind} | 0.50 |" in out, out


def test_band_probe_runs_on_a_teacher_and_draws_its_picture(student_dir, tmp_path, capsys):
    pic = tmp_path / "band.png"
    drift.main(drift.DriftConfig(probe="band", ckpts="", teacher=str(student_dir / "teacher.pt"), seeds=1,
                                 sigmas="0.5,0.9", picture=str(pic), device="cpu"))
    out = capsys.readouterr().out
    assert "| 0.50 |" in out and "| 0.90 |" in out and pic.stat().st_size > 0


def test_auc_counts_pairs_and_ties():
    y, one = np.array([True, True, False, False]), np.arange(4)
    assert drift.auc(np.array([3., 4, 1, 2]), y, one)[0] == 1.0 and drift.auc(np.array([1., 2, 3, 4]), y, one)[0] == 0.0
    assert drift.auc(np.ones(4), y, one)[0] == 0.5 and drift.auc(np.array([3., 1, 2, 0]), y, one)[0] == 0.75
    auc, lo, hi = drift.auc(np.array([3., 1, 2, 0] * 10), np.array([True, True, False, False] * 10), np.arange(40))
    assert lo <= auc <= hi


def test_auc_interval_resamples_streams_not_windows():
    """Ten streams of 20 windows each, every window of a stream alike: 10 independent draws, not 200.
    Resampling windows would give an interval as if there were 200; resampling streams is wider."""
    rng = np.random.default_rng(1)
    y = rng.random(10) < 0.5
    s = np.where(y, 0.6, 0.4) + rng.normal(0, 0.3, 10)          # one score per stream
    stream = np.repeat(np.arange(10), 20)
    _, lo, hi = drift.auc(np.repeat(s, 20), np.repeat(y, 20), stream)
    _, wlo, whi = drift.auc(np.repeat(s, 20), np.repeat(y, 20), np.arange(200))   # as if every window were a stream
    assert hi - lo > 2 * (whi - wlo)


def test_signal_probe_scores_training_windows_with_every_candidate(student_dir, capsys, monkeypatch, tmp_path):
    calls = iter(range(10 ** 6))                                 # the test generator is untrained: a tracker that labels
    monkeypatch.setattr(drift, "track", lambda v, w: dict(valid=[True], color_id=[next(calls) % 4]))   # windows in turn
    drift.main(drift.DriftConfig(probe="signals", ckpts=str(student_dir / "student.pt"), seeds=1, windows=4,
                                 teacher=str(student_dir / "teacher.pt"), device="cpu", scores=str(tmp_path / "sig.npz"),
                                 match_w=0.6))
    out = capsys.readouterr().out
    assert "tau for mean w 0.6: literal" in out
    assert {"literal", "verdict_band", "verdict_dmd", "switch"} <= set(drift.SIGNALS)   # the literal delta, DF (3), references
    assert all(text in out for text in drift.SIGNALS.values()), out
    assert "The signal's level" in out and "before the first switch" in out
    saved = np.load(tmp_path / "sig_student.npz")
    assert set(drift.SIGNALS) <= set(saved.files) and len(saved["label"]) == len(saved["verdict_band"]) == len(saved["stream"])


def test_the_curve_probe_reads_pull_frame_by_frame(student_dir, capsys):
    drift.main(drift.DriftConfig(probe="curve", ckpts=str(student_dir / "student.pt"), seeds=1, lengths="4", after=6,
                                 device="cpu"))
    out = capsys.readouterr().out
    assert "Pull frame by frame" in out and "| f = 0 | f = 2 | f = 4 | switches |" in out, out
    row = next(line for line in out.splitlines() if line.startswith(f"| {student_dir / 'student.pt'} | 4 |"))
    assert all(0 <= float(v) <= 1 for v in row.strip("| ").split(" | ")[2:5])


def test_tau_for_a_mean_trust():
    s = np.random.default_rng(0).uniform(0.8, 1.2, 1000)
    for target in (0.3, 0.668, 0.9):
        tau = drift.tau_for_mean_w(s, 0.9, target)
        assert abs(np.minimum(1, tau / (np.maximum(s - 0.9, 0) + 1e-6)).mean() - target) < 1e-6


def test_the_old_event_is_the_one_each_video_switched_from():
    past = torch.tensor([[0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3], [0, 0, 0, 0, 1, 1]])
    ev = past[:, 2:]                                             # a window of the last 4 frames
    assert drift.old_events(past, ev).tolist() == [[1, 1, 1, 1], [3, 3, 3, 3], [0, 0, 0, 0]]


def test_bad_lengths_and_policies_are_one_line(student_dir, capsys, monkeypatch):
    st = f"--ckpts={student_dir / 'student.pt'}"
    assert_one_line_exit_2(*run_cli("tools/drift.py", [st, "--lengths=3"], capsys, monkeypatch), "--lengths=3", "chunk")
    assert_one_line_exit_2(*run_cli("tools/drift.py", [st, "--lengths=4,x"], capsys, monkeypatch), "--lengths=4,x", "chunk")
    assert_one_line_exit_2(*run_cli("tools/drift.py", [st, "--policies=recache,forget"], capsys, monkeypatch), "--policies")
    assert_one_line_exit_2(*run_cli("tools/drift.py", [st, "--sigmas=0.5,x"], capsys, monkeypatch), "--sigmas")
