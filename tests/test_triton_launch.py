"""lorakit.triton_launch: cached launches specialise at least as finely as Triton, and give Triton's results."""

import pytest
import torch

from lorakit import triton_gate, triton_launch


def test_the_key_separates_what_triton_specialises_on():
    x = torch.zeros(64)
    key = triton_launch._arg_key
    assert key((1,)) != key((2,))  # Triton makes an int equal to 1 a constant
    assert key((32,)) != key((33,))  # ... and marks ints divisible by 16
    assert key((2**31 - 16,)) != key((2**31,)) != key((2**63,))  # int32, int64, uint64 arguments
    assert key((x,)) != key((x[1:],))  # a 16-byte aligned address against a 4-byte offset view
    assert key((x,)) != key((x.double(),))
    assert key((x, 48, 0.5, None)) == key((torch.ones(8), 16, 2.0, None))  # same specialisation: one kernel
    assert key((True,)) != key((2**32 + 16,)) and key((False,)) != key((2**32,))  # i1 is not an int's class
    assert key(([1, 2],)) is None  # a kind the cache does not know goes to Triton's own launch


@pytest.fixture
def scale_add(kernel_device):
    """y = x·s + n, launched through cached_launch (a fresh wrapper: its cache starts empty)."""
    tl, triton = triton_gate.tl, triton_gate.triton

    @triton.jit
    def kernel(x_ptr, y_ptr, s, n, size, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * s + n, mask=mask)

    return triton_launch.cached_launch(kernel), kernel_device


def test_cached_launches_give_triton_results(scale_add, monkeypatch):
    """Launches that differ in alignment, int class and dtype each run the kernel of their own specialisation (on
    CUDA through the cache from the second launch of each; under the interpreter through Triton's own launch)."""
    launch, device = scale_add
    base = torch.arange(300, dtype=torch.float32, device=device)
    cases = [(base, 1), (base, 2), (base[1:], 16), (base[1:], 1), (base.double(), 3), (base, 2), (base[1:], 16)]
    triton_runs = []
    real_run = launch.fn.run
    monkeypatch.setattr(launch.fn, "run", lambda *a, **k: triton_runs.append(1) or real_run(*a, **k))
    for x, n in cases:
        for _ in range(2):
            y = torch.full_like(x, float("nan"))
            launch[(triton_gate.cdiv(x.numel(), 128),)](x, y, 0.5, n, x.numel(), BLOCK=128)
            torch.testing.assert_close(y, x * 0.5 + n, rtol=0, atol=0)
    if triton_launch.USABLE:  # five distinct specialisations: Triton launched each once, the cache the rest
        assert len(triton_runs) == 5 and len(launch._compiled) == 5
    else:
        assert len(triton_runs) == 2 * len(cases)


def test_cdiv_and_next_power_of_2_match_triton():
    if not triton_gate.HAS_TRITON:
        pytest.skip("needs Triton")
    triton = triton_gate.triton
    for a in range(0, 300):
        assert triton_gate.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 16, 128):
            assert triton_gate.cdiv(a, b) == triton.cdiv(a, b)


def test_an_empty_hook_chain_reaches_the_launcher_as_none():
    """Triton ≥ 3.5 keeps an empty HookChain as its launch hooks: the cached launch passes None (no launch metadata
    built, no hook called) until a profiler adds a hook, which is then called as Triton's launch would call it."""
    class Chain:  # Triton's knobs.HookChain: a list of calls
        def __init__(self):
            self.calls = []

        def __call__(self, *args):
            for call in self.calls:
                call(*args)

    chain = Chain()
    assert triton_launch._hook(chain) is None and triton_launch._hook(None) is None
    chain.calls.append(print)
    assert triton_launch._hook(chain) is chain
    assert triton_launch._hook(print) is print  # an older Triton's plain function hook
    knobs = getattr(triton_gate.triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime.launch_enter_hook, "calls"):
        assert type(knobs.runtime.launch_enter_hook).__name__ == "HookChain"  # the form _hook reads


def test_a_launch_hook_added_by_a_profiler_is_called_for_cached_launches(scale_add):
    launch, device = scale_add
    knobs = getattr(triton_gate.triton, "knobs", None)
    if not triton_launch.USABLE or knobs is None or not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("the cached launcher and Triton's hook chains (CUDA, Triton ≥ 3.5)")
    seen = []

    def hook(metadata):
        seen.append(metadata)

    x = torch.arange(300, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    launch[(3,)](x, y, 0.5, 2, 300, BLOCK=128)  # compiled here; cached from the next launch on
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch[(3,)](x, y, 0.5, 2, 300, BLOCK=128)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch[(3,)](x, y, 0.5, 2, 300, BLOCK=128)
    assert len(seen) == 1
