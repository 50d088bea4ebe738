"""probes.py's identity-failure probe: the classification on hand-made tracks, and one run end to end."""
import numpy as np

import probes


def track_of(colors, bg=0):
    """A made-up world.track result: a colour id per frame, -1 for a frame with no valid sprite."""
    c = np.array(colors)
    return dict(valid=c >= 0, color_id=np.maximum(c, 0), bg_id=np.full(len(c), bg))


def kind(colors, f=4):
    tr = track_of(colors)
    before = [t for t in range(f) if tr["valid"][t]]
    after = [t for t in range(f, len(colors)) if tr["valid"][t]]
    return probes.failure_kind(tr, before, after)


def test_failure_kinds():
    assert kind([2, 2, 2, 2, 2, -1, 2, 2]) == "kept"                # one dropped frame is not a failure
    assert kind([2, 2, 2, 2, 1, 1, 1, 1]) == "colour at once"
    assert kind([2, 2, 2, 2, -1, -1, 1, 1]) == "colour after a dissolve"
    assert kind([2, 2, 2, 2, -1, 1, 1, 1]) == "colour at once"     # one missing frame is not a dissolve
    tr = track_of([2] * 8)
    tr["bg_id"][5:] = 1
    assert probes.failure_kind(tr, [0, 1, 2, 3], [4, 5, 6, 7]) == "background at once"


def test_failures_probe_runs_on_a_generator(student_dir, capsys, monkeypatch):
    import sample                                                # the smoke run's 4-frame window: the rapid schedules do not fit
    monkeypatch.setattr(sample, "builtin_schedules", lambda W: [("switch", f"right@0,up@{2 * W}", 4 * W)] * 2)
    probes.main(probes.ProbeConfig(failures=str(student_dir / "student.pt"), seeds=1, device="cpu"))
    out = capsys.readouterr().out
    assert "2 switches |" in out, out                            # two schedules x one seed, one switch each
