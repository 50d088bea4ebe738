"""The CUDA selection: what only a GPU can show, on models of the small preset's shape.

    python -m pytest -q tests/test_cuda.py                       # on a GPU (skipped without one)
    CUDA_TESTS_ON_CPU=1 python -m pytest -q tests/test_cuda.py   # rehearse the code paths on the CPU

bf16 autocast, which attention paths take the flash kernel, and the compiled streaming step
replayed as a CUDA graph (last: its cold compile is the slow part, so a time limit cuts only it).
The CPU rehearsal runs the same bodies in float32 with dynamo's eager backend (flash is skipped):
it proves the test code, not CUDA.
"""
import os

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import distill
import sample
import teacher
from common import autocast, compile_
from model import build
from streaming import KVCache, stream as stream_step

TCFG = teacher.TeacherConfig(**teacher.PRESETS["small"])
DCFG = distill.DistillConfig(**distill.PRESETS["small"])


@pytest.fixture
def device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("CUDA_TESTS_ON_CPU"):
        return torch.device("cpu")
    pytest.skip("needs CUDA (CUDA_TESTS_ON_CPU=1 rehearses the code paths on the CPU)")


def small_model(device, seed=0):
    """The small preset's network with every weight random (AdaLN-Zero would output zero)."""
    torch.manual_seed(seed)
    m = build(teacher.model_args(TCFG), device=device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def small_generator(model):
    return sample.StreamModel(model, distill.stream_args(DCFG, TCFG.frames), teacher.world_of(TCFG))


def flash_paths(model, device):
    """Which attention paths run with SDPA restricted to the flash kernel (bf16 on CUDA): a path
    that flash cannot take raises. -> {path: "flash" or "not flash"}."""
    B, ch, S = 2, DCFG.chunk, TCFG.size
    x, ev = torch.randn(B, ch, 3, S, S, device=device), torch.zeros(B, ch, dtype=torch.long, device=device)
    full = KVCache(DCFG.n_sink, DCFG.n_window)
    with torch.no_grad(), autocast(device):
        while len(full) < DCFG.n_sink + DCFG.n_window:           # fill the cache: the steady state has no mask
            stream_step(model, x, torch.zeros(B, ch, device=device), ev, full, write=True)
    paths = {"bidirectional": lambda: model(x, torch.ones(B, ch, device=device), ev),             # teacher, critic
             "streaming": lambda: stream_step(model, x, torch.ones(B, ch, device=device), ev, full),   # full cache
             "block-causal": lambda: model(x.repeat(1, 2, 1, 1, 1), torch.ones(B, 2 * ch, device=device),
                                           ev.repeat(1, 2), causal_chunk=ch)}                     # ODE init: a mask
    out = {}
    for name, fn in paths.items():
        try:
            with torch.no_grad(), autocast(device), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                fn()
            out[name] = "flash"
        except RuntimeError:
            out[name] = "not flash"
    return out


def test_flash_kernel_is_taken_where_it_can_be(device):
    """SDPA restricted to flash (bf16): bidirectional and full-cache streaming run, the masked
    block-causal path cannot. The CPU rehearsal runs the paths but cannot judge them."""
    got = flash_paths(small_model(device), device)
    if device.type != "cuda":
        pytest.skip(f"flash attention is a CUDA kernel; the CPU's takes any mask ({got})")
    assert got == {"bidirectional": "flash", "streaming": "flash", "block-causal": "not flash"}, got


def test_cached_equals_block_causal_in_bf16(device):
    """The streaming cache gives the block-causal forward's output under bf16 autocast too (flash
    on the full cache, a masked kernel while filling), within bf16's rounding."""
    m, ch = small_model(device), DCFG.chunk
    T, S = 4 * ch, TCFG.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 3, S, S, generator=g).to(device)
    sigma, event = torch.rand(2, T, generator=g).to(device), torch.randint(0, 6, (2, T), generator=g).to(device)
    cache, outs = KVCache(DCFG.n_sink, DCFG.n_window), []
    with torch.no_grad(), autocast(device):
        full = m(x, sigma, event, causal_chunk=ch).float()
        for i in range(0, T, ch):
            outs.append(stream_step(m, x[:, i:i + ch], sigma[:, i:i + ch], event[:, i:i + ch], cache, write=True).float())
    err = (torch.cat(outs, 1) - full).abs().max() / full.abs().max()
    assert err < 2e-2, f"relative error {err:.4f}"


def test_a_video_hardly_depends_on_its_batch_on_the_device(device):
    """A video's frames alone and beside another video, for a few chunks: its noise is its own
    (test_sample), but kernels may change with the batch size: float32 rounding on the CPU (at
    this model size the CPU's matmuls already differ in the last bits), bf16 rounding on a GPU."""
    g = small_generator(small_model(device))
    n = 4 * DCFG.chunk
    one = sample.schedule_tensor(f"right@0,up@{2 * DCFG.chunk}", n, DCFG.chunk, 1, device)
    two = torch.cat([one, sample.schedule_tensor("down@0,left@3", n, DCFG.chunk, 1, device)])
    alone = sample.generate(g, one, [5], "recache")
    paired = sample.generate(g, two, [5, 9], "recache")
    diff = (alone[0] - paired[0]).abs().max()
    assert diff < 0.1, f"video 0 moved by {diff:.3f} when it shared its batch"
    if device.type == "cpu":
        assert diff < 1e-5


def test_compiled_stream_replays_without_recompiling(device):
    """sample.py's compiled streaming step (mode reduce-overhead: a CUDA graph) gives eager's
    frames within bf16 rounding, and a second stream of the same shape compiles nothing new."""
    eager = small_generator(small_model(device))
    kw = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="eager")
    compiled = small_generator(compile_(small_model(device), True, dynamic=False, **kw))
    torch._dynamo.reset()
    n = DCFG.chunk * ((DCFG.n_sink + DCFG.n_window) // DCFG.chunk + 3)   # past a full cache
    ev = sample.schedule_tensor(f"right@0,up@{n // 2}", n, DCFG.chunk, 1, device)
    a = sample.generate(eager, ev, [3], "recache")
    b = sample.generate(compiled, ev, [3], "recache")
    g0 = counters["stats"]["unique_graphs"]
    c = sample.generate(compiled, ev, [3], "recache")
    assert counters["stats"]["unique_graphs"] == g0, "a warmed stream recompiled"
    assert torch.equal(b, c), "replaying the same stream changed its frames"
    assert (a - b).abs().max() < 0.1, f"compiled and eager frames differ by {(a - b).abs().max():.3f}"
