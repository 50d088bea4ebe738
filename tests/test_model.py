"""Model invariants: cache = block-causal forward, causality, AdaLN-Zero, no gradient through
the cache, patchify round trip, bounded cache, recache, per-stream clear, RoPE, compile."""
import pytest
import torch

import model as model_module
import streaming
from conftest import CH, SIGMAS, MC, MODEL_ARGS, B, T, randomized
from model import VideoDiT, add_noise, apply_rope, build, pred_x0, rope_angles, rope_pairs, rotation, shift_sigma
from streaming import KVCache, randn, recache, rollout, stream as stream_step


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, 16, 16, generator=g)
    sigma = torch.rand(B, T, generator=g)
    event = torch.randint(0, 6, (B, T), generator=g)
    return x, sigma, event


def stream(m, x, sigma, event, n_sink=2, n_window=64):
    cache, outs = KVCache(n_sink, n_window), []
    for i in range(0, x.shape[1], CH):
        s = slice(i, i + CH)
        outs.append(stream_step(m, x[:, s], sigma[:, s], event[:, s], cache, write=True))
    return torch.cat(outs, 1), cache


def test_cached_equals_block_causal():
    m = randomized()
    x, sigma, event = inputs()
    with torch.no_grad():
        full = m(x, sigma, event, causal_chunk=CH)
        cached, _ = stream(m, x, sigma, event)
    assert torch.allclose(full, cached, atol=1e-5), (full - cached).abs().max()


def test_causality():
    m = randomized()
    x, sigma, event = inputs()
    x2, event2 = x.clone(), event.clone()
    x2[:, 5:] += 1.0                                             # perturb frames of chunk 2 and 3
    event2[:, 6:] = (event2[:, 6:] + 1) % 6
    with torch.no_grad():
        a, b = m(x, sigma, event, causal_chunk=CH), m(x2, sigma, event2, causal_chunk=CH)
        sa, _ = stream(m, x2, sigma, event2)
    assert torch.equal(a[:, :4], b[:, :4])                       # chunks 0, 1 untouched
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3              # and the perturbation is really seen
    assert torch.allclose(sa, b, atol=1e-5)
    bi_a, bi_b = m(x, sigma, event), m(x2, sigma, event2)        # the bidirectional path does look ahead
    assert (bi_a[:, :4] - bi_b[:, :4]).abs().max() > 1e-3


def test_zero_output_at_init():
    m = VideoDiT(MC)
    x, sigma, event = inputs()
    assert torch.equal(m(x, sigma, event), torch.zeros_like(x))


def test_build_from_model_args_and_state():
    torch.manual_seed(0)
    m = build(MODEL_ARGS)
    assert isinstance(m, VideoDiT) and m.mc == MC
    r = randomized()
    m2 = build(MODEL_ARGS, r.state_dict())
    x, sigma, event = inputs()
    with torch.no_grad():
        assert torch.equal(m2(x, sigma, event), r(x, sigma, event))


def test_no_gradient_reaches_the_cache():
    m = randomized()
    x, sigma, event = inputs()
    x = x.requires_grad_()
    cache = KVCache(2, 64)
    stream_step(m, x[:, :2], sigma[:, :2], event[:, :2], cache, write=True)
    assert not cache.frames.requires_grad and not cache.kv.requires_grad
    out = stream_step(m, x[:, 2:4], sigma[:, 2:4], event[:, 2:4], cache)
    out.sum().backward()
    assert x.grad[:, :2].abs().max() == 0                        # history received nothing
    assert x.grad[:, 2:4].abs().max() > 0


def test_patchify_round_trip():
    m = VideoDiT(MC)
    x = torch.randn(B, T, 3, 16, 16)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    p = m.patchify(x)                                            # token (row 1, col 2) of frame 3 holds that patch
    assert torch.equal(p[0, 3, 1 * 4 + 2], x[0, 3, :, 4:8, 8:12].reshape(-1))


@pytest.mark.parametrize("grid", [4, 8])
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_every_spatial_rope_pair_carries_position(grid, head_dim):
    """At t = 0 the time pairs are 0 everywhere; every other pair is spatial, and the sine of its
    angle must be non-zero somewhere on the grid. A Nyquist frequency (pi per cell) has sine 0
    at every integer position: those channels would carry only parity, and at grid 4 would be
    blind to the difference between positions 1 and 3 for a query at 0 (the old code had it)."""
    ang = rope_angles(torch.zeros(1, dtype=torch.long), grid, head_dim, "cpu")   # (grid*grid, head_dim/2)
    assert ang.shape == (grid * grid, head_dim // 2)
    spatial = ang.abs().amax(0) > 0                              # pairs whose angle depends on the position
    assert spatial.sum() >= head_dim // 4                        # about three quarters of the pairs are spatial
    sines = ang[:, spatial].sin().abs().amax(0)                  # per spatial pair: its largest |sin| on the grid
    assert (sines > 1e-3).all(), sines
    rows = ang.view(grid, grid, -1)[:, 0, spatial]               # moving down a column: the row pairs turn
    cols = ang.view(grid, grid, -1)[0, :, spatial]               # moving along a row: the col pairs turn
    turns_r, turns_c = rows.std(0) > 0, cols.std(0) > 0
    assert turns_r.any() and turns_c.any() and (turns_r ^ turns_c).all()   # each spatial pair is a row or a col pair
    rot = torch.polar(torch.ones_like(rows), rows)               # rotation of each row pair at each row
    for a in range(grid):                                        # relative row positions are told apart by the row pairs
        for b in range(a + 1, grid):
            assert (rot[a] - rot[b]).abs().max() > 1e-3


def test_rope_time_pairs_follow_the_frame_position():
    ang = rope_angles(torch.tensor([0, 3]), 4, 32, "cpu").view(2, 16, -1)
    time_pairs = rope_angles(torch.zeros(1, dtype=torch.long), 4, 32, "cpu").abs().amax(0) == 0
    assert time_pairs.any() and (ang[0, :, time_pairs] == 0).all() and (ang[1, :, time_pairs] != 0).all()
    assert torch.equal(ang[0, :, ~time_pairs], ang[1, :, ~time_pairs])   # spatial pairs do not depend on time


def test_cpu_rope_equals_the_pairwise_rotation():
    """The CPU's complex multiply and the pairwise form (CUDA's) are one rotation, for fp32 and
    bf16 inputs and for the non-contiguous q/k views the attention block passes in."""
    ang = rope_angles(torch.arange(3), 4, 32, "cpu")                 # (3*16, 16)
    qkv = torch.randn(2, 48, 3 * 4 * 32)                             # (B,L,3*H*hd), q/k/v are strided views
    q = qkv.view(2, 48, 3, 4, 32)[:, :, 1].transpose(1, 2)           # (B,H,L,hd), the k slice
    for x in (q, q.bfloat16()):
        assert torch.allclose(apply_rope(x, rotation(ang)).float(), rope_pairs(x, ang).float(), atol=1e-6, rtol=1e-5 if x.dtype == torch.float32 else 1e-2)
    assert apply_rope(q.bfloat16(), rotation(ang)).dtype == torch.bfloat16


def test_sink_and_window_keep_memory_bounded():
    m = randomized()
    cache = KVCache(n_sink=2, n_window=4)
    x = torch.randn(1, 2, 3, 16, 16)
    first, buffers = None, None
    with torch.no_grad():
        for i in range(40):                                      # 80 frames = 20x the window
            stream_step(m, x + i, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), cache, write=True)
            first = cache.frames[:, :2].clone() if i == 0 else first
            buffers = buffers or (cache.kv.data_ptr(), cache.kv.shape)
            assert len(cache) == min(6, 2 * (i + 1)) and cache.kv.shape[4] == 6
            assert (cache.kv.data_ptr(), cache.kv.shape) == buffers      # preallocated once, written in place
    assert cache.n_seen == 80 and len(cache) == 6
    frames, _ = cache.ordered()
    assert torch.equal(frames[:, :2], first)                     # the sink holds the first frames
    assert torch.equal(frames[:, -2:], (x + 39))                 # the window holds the newest, in order
    assert sorted(cache.pos.tolist()) == list(range(6))          # positions stay inside the cache's range


def test_recache_changes_cache_only_when_event_changes():
    m = randomized()
    x, sigma, event = inputs()
    event = torch.zeros(B, T, dtype=torch.long)
    with torch.no_grad():
        _, cache = stream(m, x, torch.zeros(B, T), event)
        filled = lambda c: c.kv[:, :, :, :, :len(c)]             # noqa: E731  (depth,2,B,H,n,N,hd)
        before = filled(cache).clone()
        recache(m, cache, torch.zeros(B, dtype=torch.long), CH)           # same event: nothing changes
        assert torch.equal(before, filled(cache))
        _, ref = stream(m, x, torch.zeros(B, T), torch.full((B, T), 3))  # what writing under event 3 gives
        recache(m, cache, torch.full((B,), 3), CH)
    assert all((before[i] - filled(cache)[i]).abs().max() > 1e-3 for i in range(MC.depth))
    assert torch.allclose(filled(cache), filled(ref), atol=1e-5)
    assert (cache.ordered()[1] == 3).all()


def test_recache_window_leaves_the_sink_under_its_old_event():
    """LongLive's inference recache: the sink keeps its keys and values bit for bit; the window
    is what writing it under the new event after a sink under the old one gives."""
    m = randomized()
    x, _, _ = inputs()
    old = torch.zeros(B, T, dtype=torch.long)
    with torch.no_grad():
        _, cache = stream(m, x, torch.zeros(B, T), old)
        sink = cache.kv[:, :, :, :, :2].clone()
        _, ref = stream(m, x, torch.zeros(B, T), torch.where(torch.arange(T) < 2, old, 3))
        recache(m, cache, torch.full((B,), 3), CH, relabel_sink=False)
    assert torch.equal(cache.kv[:, :, :, :, :2], sink)
    assert torch.allclose(cache.kv[:, :, :, :, :len(cache)], ref.kv[:, :, :, :, :len(ref)], atol=1e-5)
    assert cache.ordered()[1][:, :2].eq(0).all() and cache.ordered()[1][:, 2:].eq(3).all()


def test_recache_touches_only_the_streams_whose_event_changed():
    m = randomized()
    x, _, _ = inputs()
    with torch.no_grad():
        _, cache = stream(m, x, torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long))
        before = cache.kv[:, :, :, :, :len(cache)].clone()
        recache(m, cache, torch.tensor([3, 0]), CH)              # only stream 0 switches
    after = cache.kv[:, :, :, :, :len(cache)]
    assert torch.equal(after[:, :, 1], before[:, :, 1])          # stream 1 untouched, bit for bit
    assert (after[:, :, 0] - before[:, :, 0]).abs().max() > 1e-3
    assert (cache.ordered()[1][0] == 3).all() and (cache.ordered()[1][1] == 0).all()


def test_recache_runs_exactly_at_the_chunks_that_open_with_a_switch(monkeypatch):
    """A chunk opens with a switch when some stream's first event differs from the frame before it
    (the cache's newest for the first chunk); rollout's recache runs at exactly those chunks."""
    ev = torch.zeros(2, 12, dtype=torch.long)
    ev[0, 6:], ev[1, 9:], ev[1, 4:6] = 3, 5, 2                   # chunk 2, chunk 3; a switch inside chunk 1 is
    m, calls = randomized(), []                                  # seen at the next chunk's boundary: 2 vs 2, none
    real = streaming.recache
    monkeypatch.setattr(streaming, "recache", lambda *a, **k: calls.append(a[1].n_seen) or real(*a, **k))
    with torch.no_grad():
        cache = KVCache(2, 8)
        rollout(m, torch.randn(2, 3, 3, 16, 16), torch.zeros(2, 3, dtype=torch.long), SIGMAS, 3, cache)
        assert calls == []                                       # an empty cache: nothing to switch from
        rollout(m, torch.randn(2, 3, 3, 16, 16), torch.full((2, 3), 4), SIGMAS, 3, cache)
        assert calls == [3]                                      # the cache's newest frame was event 0
        rollout(m, torch.randn(2, 3, 3, 16, 16), torch.full((2, 3), 4), SIGMAS, 3, cache)
        assert calls == [3]                                      # no switch: no recache
        calls.clear()
        rollout(m, torch.randn(2, 12, 3, 16, 16), torch.where(ev == 0, 4, ev), SIGMAS, 3, cache)
    assert calls == [15, 18]                                     # 9 frames before, then chunks 2 and 3: recache twice


def test_clear_hides_history_from_the_masked_streams_only():
    m = randomized()
    x, sigma, event = inputs()
    with torch.no_grad():
        _, cache = stream(m, x[:, :4], torch.zeros(B, 4), event[:, :4], n_window=8)
        cache.clear(torch.tensor([True, False]))
        assert cache.valid.shape == (B, 10) and not cache.valid[0].any() and cache.valid[1, :4].all()
        got = stream_step(m, x[:, 4:6], sigma[:, 4:6], event[:, 4:6], cache)
        fresh = stream_step(m, x[:1, 4:6], sigma[:1, 4:6], event[:1, 4:6], KVCache(2, 8))   # stream 0 as if new
        _, kept = stream(m, x[:, :4], torch.zeros(B, 4), event[:, :4], n_window=8)
        ref = stream_step(m, x[:, 4:6], sigma[:, 4:6], event[:, 4:6], kept)               # nobody cleared
    assert torch.allclose(got[0], fresh[0], atol=1e-5)           # the cleared stream sees only itself
    assert torch.allclose(got[1], ref[1], atol=1e-5)             # the other keeps its history
    assert (got[0] - ref[0]).abs().max() > 1e-3
    with torch.no_grad():                                        # frames written after the clear are seen again
        stream_step(m, x[:, 4:6], torch.zeros(B, 2), event[:, 4:6], cache, write=True)
    assert cache.valid[0].sum() == 2 and cache.valid[1].sum() == 6


def test_randn_per_video_generators_do_not_depend_on_the_batch():
    one = randn((1, 2, 3), [torch.Generator().manual_seed(5)], "cpu")
    two = randn((2, 2, 3), [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)], "cpu")
    assert torch.equal(one[0], two[0]) and not torch.equal(two[0], two[1])
    state = torch.get_rng_state()
    randn((2, 3), torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(state, torch.get_rng_state())             # a generator given: the global RNG is untouched


def test_ring_cache_equals_concatenate_and_evict():
    """The in-place ring gives exactly what the obvious cache gives: the sink's and the last
    window's keys/values concatenated in stream order, at positions 0..n-1."""
    m = randomized()
    x, sigma, event = inputs()
    x = torch.cat([x, x.flip(1), x + 1], 1)                      # 24 frames through a cache of 2 + 4
    sigma, event = sigma.repeat(1, 3), event.repeat(1, 3)
    cache, kvs, outs = KVCache(2, 4), [], []                     # kvs: every frame's (depth,2,B,H,1,N,hd)
    with torch.no_grad():
        for i in range(0, 24, CH):
            s = slice(i, i + CH)
            keep = kvs[:2] + kvs[2:][-4:]                        # sink + the newest 4, in stream order
            n = len(keep)
            past = (torch.cat(keep, 4), torch.arange(n), torch.arange(n, n + CH), None) if keep else None
            ref = m(x[:, s], sigma[:, s], event[:, s], past=past)
            outs.append((ref, stream_step(m, x[:, s], sigma[:, s], event[:, s], cache)))
            _, kv = m(x[:, s], torch.zeros(B, CH), event[:, s], past=past, return_kv=True)
            kvs += list(kv.split(1, 4))
            stream_step(m, x[:, s], torch.zeros(B, CH), event[:, s], cache, write=True)
    assert len(outs) == 12 and all(torch.allclose(a, b, atol=1e-5) for a, b in outs)
    assert (outs[-1][0] - outs[-2][0]).abs().max() > 1e-3        # and the frames really differ


def test_compiled_stream_is_one_graph_equals_eager_and_does_not_recompile_as_it_grows():
    """Dynamo (no inductor, so it is fast) sees a handful of graphs, empty / filling / full cache
    with and without keys out, and none new however long the stream runs or how often it restarts.
    Traced, RoPE rotates pairwise in real arithmetic, so each forward is one graph (fullgraph: no break
    at a complex multiply, which inductor cannot generate), and the stream equals eager's."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from model import rotation
    torch._dynamo.reset()
    m = randomized()
    compiled = torch.compile(m, backend="eager", dynamic=False, fullgraph=True)
    graphs, base = [], counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for n in (16, 40, 40):
            args = (torch.randn(1, n, 3, 16, 16), torch.zeros(1, n, dtype=torch.long), [1.0, 0.5], CH)
            out = rollout(compiled, *args, KVCache(2, 4), gen=torch.Generator().manual_seed(n))
            graphs.append(counters["stats"]["unique_graphs"] - base)
        assert torch.allclose(out, rollout(m, *args, KVCache(2, 4), gen=torch.Generator().manual_seed(n)), atol=1e-5)
    assert graphs[0] <= 6 and graphs[2] == graphs[1] == graphs[0], graphs
    ang = torch.rand(4, 8)
    assert rotation(ang).is_complex() and not torch.compile(rotation, backend="eager", fullgraph=True)(ang).is_complex()
    torch._dynamo.reset()


def test_compile_in_place_keeps_plain_state_dict_keys():
    from common import compile_
    m = randomized()
    keys = list(m.state_dict())
    assert compile_(m, True, backend="eager") is m               # nn.Module.compile: the same object
    assert list(m.state_dict()) == keys and not any("_orig_mod" in k for k in m.state_dict())
    torch._dynamo.reset()


def test_flow_matching_convention():
    x0, eps, sigma = torch.randn(B, T, 3, 4, 4), torch.randn(B, T, 3, 4, 4), torch.rand(B, T)
    xs = add_noise(x0, eps, sigma)
    assert torch.allclose(pred_x0(xs, eps - x0, sigma), x0, atol=1e-6)      # v = eps - x0
    assert torch.equal(add_noise(x0, eps, torch.zeros(B, T)), x0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigma(s, 1.0), s) and shift_sigma(s, 5.0)[1] > 0.6
    assert shift_sigma(s, 5.0)[0] == 0 and shift_sigma(s, 5.0)[-1] == 1


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_equals_sdpa(masked):
    """The CPU's written-out attention is SDPA's, with and without a key mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5 if i == 0 else 9, 8, generator=g) for i in range(3))
    mask = (torch.rand(2, 1, 1, 9, generator=g) > 0.3) | (torch.arange(9) >= 5) if masked else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(model_module.attention(q, k, v, mask), ref, atol=1e-6)


def test_precision_auto_streams_an_interactive_cpu_run_in_fp32(monkeypatch):
    """The rule the benchmark justifies: on a CPU with native bf16, auto trains and evaluates in bf16 but
    runs sample.py and the web page (interactive) in fp32; an explicit --precision is obeyed; CUDA is bf16."""
    import common
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    monkeypatch.setitem(common.BF16, "cuda", True)
    for precision, interactive, device, bf16 in [("auto", False, cpu, True), ("auto", True, cpu, False),
                                                 ("bf16", True, cpu, True), ("fp32", False, cpu, False),
                                                 ("auto", True, cuda, True), ("fp32", True, cuda, False)]:
        common.set_precision(precision, device, interactive)
        assert common.BF16[device.type] == bf16, (precision, interactive, device)


def test_precision_auto_bf16_where_the_cpu_multiplies_it_and_weights_stay_fp32(monkeypatch):
    import common
    import teacher
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    common.set_precision("auto", cpu)
    assert not common.BF16["cpu"]                                # no native bf16: auto stays fp32
    common.set_precision("bf16", cpu)
    assert common.BF16["cpu"]
    cfg = teacher.TeacherConfig(dim=32, depth=2, heads=2, batch=4, frames=4, warmup=1)
    m = build(teacher.model_args(cfg))
    ema, opt = common.ema_copy(m), common.adamw(m.parameters(), lr=1e-3)
    x, ev = torch.randn(4, 4, 3, 16, 16), torch.zeros(4, 4, dtype=torch.long)
    loss, _, applied = teacher.train_step(m, ema, opt, x, ev, step=0, cfg=cfg)
    assert applied and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in m.parameters())            # fp32 master weights
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
    with common.autocast(cpu):
        assert m.blocks[0].qkv(torch.randn(2, 32)).dtype == torch.bfloat16  # the matmuls run in bf16
    common.set_precision("fp32", cpu)
    with common.autocast(cpu):
        assert m.blocks[0].qkv(torch.randn(2, 32)).dtype == torch.float32
