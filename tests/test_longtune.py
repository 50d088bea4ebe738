"""Long tuning with per-stream switches: the persistent Streams, per-frame window events, the
cache at a switch (recache / keep / clear, per stream), the probe, and longtune.py end to end."""
import dataclasses

import pytest
import torch

import longtune
import trust_region
from common import load_checkpoint
from config import BadInput, check_config
from conftest import CH, SIGMAS, longtune_cfg, randomized, stream_setup
from streaming import KVCache, rollout
from metrics import switches
from world import World


def stream_with_switch(m, switch, pieces=(8, 6, 6), ev=None):
    torch.manual_seed(0)
    T = sum(pieces)
    noise = torch.randn(2, T, 3, 16, 16)
    if ev is None:
        ev = torch.zeros(2, T, dtype=torch.long)
        ev[:, 10:] = torch.tensor([3, 1])[:, None]               # both videos switch at frame 10
    cache, outs, i = KVCache(2, 6), [], 0
    torch.manual_seed(1)
    for n in pieces:
        outs.append(rollout(m, noise[:, i:i + n], ev[:, i:i + n], SIGMAS, CH, cache, switch=switch))
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
    assert len(c_re) == len(c_keep) == len(c_clear) == 8 and c_clear.n_seen == 20
    for b in range(2):                                           # clear hid everything before the switch
        assert not c_clear.valid[b, :2].any()                    # the sink (frames 0, 1) included
        assert (c_clear.born[c_clear.valid[b]] >= 10).all() and c_clear.valid[b].sum() == 6


@pytest.mark.parametrize("switch", ["clear", "recache"])
def test_switch_acts_only_on_the_streams_that_switched(switch):
    """Stream 0 switches at frame 10, stream 1 never does: stream 1 generates exactly what it
    generates in a batch where nobody switches, and stream 0 sees its cache changed."""
    m = randomized()
    ev = torch.zeros(2, 20, dtype=torch.long)
    ev[0, 10:] = 3
    with torch.no_grad():
        got, _ = stream_with_switch(m, switch, ev=ev)
        calm, _ = stream_with_switch(m, switch, ev=torch.zeros(2, 20, dtype=torch.long))
        keep, _ = stream_with_switch(m, "keep", ev=ev)
    assert torch.allclose(got[1], calm[1], atol=1e-5)            # the stream that did not switch is untouched
    assert torch.allclose(got[0, :10], calm[0, :10], atol=1e-5)
    assert (got[0, 10:] - keep[0, 10:]).abs().max() > 1e-3       # the one that switched differs from keep
    assert torch.allclose(keep[1], calm[1], atol=1e-5)


def test_cache_stays_bounded_over_a_10x_window_stream():
    m = randomized()
    cache = KVCache(2, 4)
    with torch.no_grad():
        rollout(m, torch.randn(1, 60, 3, 16, 16), torch.zeros(1, 60, dtype=torch.long), SIGMAS, CH, cache)
    assert cache.n_seen == 60 and len(cache) == 6 and cache.kv.shape[4] == 6


def make_streams(batch=2, windows=3, seed=0, **kw):
    cfg = longtune.LongtuneConfig(batch=batch, windows=windows, context=2, **kw)
    return longtune.Streams(cfg, stream_setup(), 16, torch.Generator().manual_seed(seed), "cpu", batch)


@pytest.mark.parametrize("window_events", ["true", "current"])
def test_streams_use_the_inference_rollout(window_events):
    """Longtune's persistent rollout state generates exactly what the shared rollout generates."""
    m = randomized()
    s = make_streams(window_events=window_events)
    ev = s.events.clone()
    with torch.no_grad():
        torch.manual_seed(5)
        w1, e1, mask1, _ = s.advance(m, SIGMAS, exit_step=3)
        w2, e2, mask2, _ = s.advance(m, SIGMAS, exit_step=3)
        torch.manual_seed(5)
        cache = KVCache(2, 8)
        r1 = rollout(m, torch.randn(2, 8, 3, 16, 16), ev[:, :8], SIGMAS, 2, cache)
        r2 = rollout(m, torch.randn(2, 6, 3, 16, 16), ev[:, 8:14], SIGMAS, 2, cache)
    assert torch.equal(w1, r1) and mask1.all()
    assert torch.equal(w2[:, 2:], r2) and torch.equal(w2[:, :2], r1[:, -2:])   # K context frames + F new
    assert mask2.tolist() == [False, False] + [True] * 6
    if window_events == "true":
        assert torch.equal(e1, ev[:, :8]) and torch.equal(e2, ev[:, 6:14])    # each frame's own event
    else:
        assert torch.equal(e2, ev[:, 13:14].expand(-1, 8))                      # the window's current event


@pytest.mark.parametrize("window_events", ["true", "current"])
def test_window_events_match_the_events_frames_were_generated_under(window_events, monkeypatch):
    """Record the event each frame is generated under (the rollout's input), across windows and
    a reset of the streams: with 'true' the supervised window's events are exactly those, so no
    frame generated under one event is supervised under another; with 'current' every frame of
    the window gets the newest frame's event."""
    m = randomized()
    made = []
    real = longtune.rollout

    def spy(model, noise, event, *a, **kw):
        made.append(event.clone())
        return real(model, noise, event, *a, **kw)
    monkeypatch.setattr(longtune, "rollout", spy)
    s = make_streams(batch=3, windows=3, max_switches=3, window_events=window_events)
    W, seen_switch = 8, False
    with torch.no_grad():
        for _ in range(6):                                       # 26-frame videos: one reset on the way
            schedule = s.events.clone()
            window, ev, mask, holds_switch = s.advance(m, SIGMAS, exit_step=0)
            gen_ev = torch.cat(made, 1)[:, -W:]                  # what the window's frames were generated under
            assert window.shape[:2] == ev.shape == (3, W)
            assert torch.equal(holds_switch, (gen_ev != gen_ev[:, -1:]).any(1))
            seen_switch |= bool(holds_switch.any())
            if window_events == "true":
                assert torch.equal(ev, gen_ev)
            else:
                assert torch.equal(ev, gen_ev[:, -1:].expand(-1, W))
            assert torch.equal(gen_ev[:, -1], schedule[:, s.t - 1] if s.t else schedule[:, -1])
            video = torch.cat(made, 1)                           # every event of this video so far
            assert torch.equal(s.unswitched, (video == video[:, :1]).all(1))   # Floor's windows: no switch yet
            if s.t == 0:                                         # the videos ended: new schedules, new history
                made.clear()
    assert seen_switch


def test_streams_draw_schedules_per_stream():
    s = make_streams(batch=6, windows=8)
    at = [tuple(f for f, _, _ in switches(e)) for e in s.events]
    assert all(1 <= len(a) <= s.cfg.max_switches for a in at)     # every stream switches, after the first window
    assert all(f >= s.stream["window"] and f % s.stream["chunk"] == 0 for a in at for f in a)
    assert len(set(at)) >= 2, at                                 # not one switch pattern shared by the batch


def test_probe_never_touches_the_global_rng():
    m = randomized()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    p = longtune.probe(m, stream_setup(), World(), 2, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    assert {"react", "latency", "n_react", "follow", "identity"} <= set(p)
    assert p == pytest.approx(longtune.probe(m, stream_setup(), World(), 2, torch.device("cpu")), nan_ok=True)


def test_tune_update_is_keyword_only():
    with pytest.raises(TypeError):
        longtune.tune_update(None, None, None, None, None, None, None, None, None, None)


@pytest.mark.parametrize("kw,name", [
    (dict(), "longtune.pt"),
    (dict(trust_region=True), "deltaforcing.pt"),
    (dict(switch_cache="clear"), "longtune.pt"),
    (dict(window_events="current"), "longtune.pt"),
    (dict(critic_frames="new", switch_cache="recache_window"), "longtune.pt"),   # LongLive's critic mask and inference
    (dict(trust_region=True, switch_cache="clear", window_events="current", out_name="df_clear.pt"), "df_clear.pt"),
    (dict(trust_region=True, tr_floor=False, out_name="df_nofloor.pt"), "df_nofloor.pt"),   # s0 = 0
])
def test_longtune_end_to_end(student_dir, tmp_path, kw, name, capsys):
    longtune.main(longtune_cfg(tmp_path, student_dir / "student.pt", **kw))
    ck = load_checkpoint(str(tmp_path / name), ["longtune"], "")
    assert ck["step"] == 2 and {"react", "latency", "follow"} <= set(ck["metrics"])
    assert all(ck["config"][k] == v for k, v in kw.items())
    out = capsys.readouterr().out
    assert f"switch cache {ck['config']['switch_cache']}" in out and f"window events {ck['config']['window_events']}" in out
    if kw.get("trust_region"):                                   # Delta Forcing logs its trust weights
        assert " w " in out and " s " in out
        assert (" floor " in out) == ck["config"]["tr_floor"]    # the floor, when it is used, is logged


@pytest.mark.parametrize("kw,msg", [
    (dict(switch_cache="sometimes"), "recache, keep, clear"),
    (dict(window_events="all"), "true, current"),
    (dict(context=3), "whole number of 2-frame chunks"),
    (dict(context=8), "--context=8"),
    (dict(tr_anchor=True), "--tr_anchor=True is a Delta Forcing knob: add --trust_region=True"),
    (dict(tau=0.01), "--tau=0.01 is a Delta Forcing knob"),
    (dict(trust_region=True, tr_literal=True, tr_verdict="window"), "--tr_literal=True reads no band verdict"),
])
def test_longtune_bad_input(student_dir, tmp_path, kw, msg):
    cfg = longtune_cfg(tmp_path, student_dir / "student.pt", **kw)
    with pytest.raises(BadInput, match=msg):
        check_config(cfg)                                        # what the CLI checks first: ranges and choices
        longtune.load_student(cfg)                               # then what needs the checkpoints


def test_the_loss_takes_each_knob_by_its_flag_name_and_holds_no_default():
    """One name per knob from the flag down to the equation, and one source for each default (the config)."""
    knobs = [f for f in dataclasses.fields(trust_region.TrustRegion) if f.init]
    assert {f.name for f in knobs} <= {f.name for f in dataclasses.fields(longtune.LongtuneConfig)} and len(knobs) == 16
    assert all(f.default is dataclasses.MISSING for f in knobs)
    cfg = longtune.LongtuneConfig(tau=0.125, lam=3.0, tr_floor=False)
    t = trust_region.TrustRegion.from_config(cfg)
    assert (t.tau, t.lam, t.floor) == (0.125, 3.0, None) and t.levels == [0.4, 0.45, 0.5, 0.55]
    assert dataclasses.asdict(longtune.LongtuneConfig())["window_events"] == "true"


def test_the_floor_is_the_median_of_unswitched_windows_and_trusts_every_window_until_known():
    """DF (4)'s floor s0 (--tr_floor): only windows whose video has not switched count, the oldest leave the
    buffer, and until `least` were seen s0 = inf (w = 1, the baseline)."""
    f = trust_region.Floor(size=6, least=3)
    assert f.value() == float("inf")
    f.add(torch.tensor([1.0, 100.0, 2.0]), torch.tensor([True, False, True]))
    assert f.value() == float("inf")                             # two seen, three needed
    f.add(torch.tensor([3.0, 50.0]), torch.tensor([True, False]))
    assert f.value() == 2.0                                      # the median of 1, 2, 3; the switched 100 and 50 not
    f.add(torch.tensor([7.0] * 4), torch.tensor([False] * 4))
    assert f.value() == float("inf")                             # the buffer holds the last 6 windows: one unswitched left


def test_the_floor_is_nanmedian_without_its_sync_and_keeps_its_size():
    """The sort-based median equals torch.nanmedian on any buffer; a batch wider than the buffer keeps its newest."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = trust_region.Floor(size=32, least=1)
        s = torch.rand(40, generator=g)
        keep = torch.rand(40, generator=g) < 0.5
        f.add(s, keep | (torch.arange(40) == 39))                # at least one seen
        assert f.buf.shape == (32,) and f.value() == f.buf.nanmedian()


def test_tune_update_reads_the_floor_of_earlier_updates_only(monkeypatch):
    """DF (4)'s floor s0, where the loss is made: at each update s0 is the lower median of exactly the s of
    earlier updates' windows whose video had not switched (inf before any), never this update's."""
    import distill
    nets = distill.DMDNets(teacher=randomized(2), student=randomized(0), ema=None, critic=randomized(1), opt=None,
                           opt_critic=None)
    nets.opt = torch.optim.SGD(nets.student.parameters(), lr=0.0)
    nets.opt_critic = torch.optim.SGD(nets.critic.parameters(), lr=0.0)
    cfg = longtune.LongtuneConfig(trust_region=True, critic_ratio=1, context=2, windows=4, batch=4)
    tr = trust_region.TrustRegion.from_config(cfg)
    tr.floor = trust_region.Floor(least=1)
    calls, real = [], trust_region.delta_forcing_loss

    def spy(*a, **k):
        buf = tr.floor.buf
        calls.append((float(k["s0"]), [] if buf is None else sorted(buf[~buf.isnan()].tolist())))
        return real(*a, **k)
    monkeypatch.setattr(trust_region, "delta_forcing_loss", spy)
    s = longtune.Streams(cfg, stream_setup(), 16, torch.Generator().manual_seed(0), torch.device("cpu"), 4)
    torch.manual_seed(0)
    earlier = []
    for _ in range(4):
        logs = longtune.tune_update(s, nets, cfg, stream=stream_setup(), m=6.0, tr=tr)[4]
        f, buf = calls[-1]
        assert buf == pytest.approx(sorted(earlier))             # the floor holds the earlier updates' windows only
        assert f == (sorted(earlier)[(len(earlier) - 1) // 2] if earlier else float("inf"))
        if "s" in logs:
            earlier += logs["s"][s.unswitched].tolist()
    assert len(earlier) > 0
