"""The wide form of the fused linear (fast/wide.py): [x | h]·[W | s·B]ᵀ in one GEMM per output. Held to the
reference path (loss and every gradient, float32, CPU), with the wide calls counted so that a silent fallback
to the plain form fails; and the base weights' storage is what it should be before, during and after."""

import copy
import importlib

import pytest
import torch

import lorakit
from lorakit.core.api import set_active
from lorakit.fast import norms, wide
from support import rel_norm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 3e-5  # float32: reordered sums only; a wrong term or gradient is off by > 1e-2


def _adapt(model, name="default", r=4):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                  init_lora_weights=False), name)
    return model.train()


def _batch(seed=0):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _grads(model, ids, forwards=1):
    loss = sum(model(input_ids=ids, labels=ids).loss for _ in range(forwards))
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)  # inactive adapters: None


def _assert_same(ref, fast, ids, forwards=1):
    l0, g0 = _grads(ref, ids, forwards)
    l1, g1 = _grads(fast, ids, forwards)
    assert abs(l0.item() - l1.item()) <= TOL * abs(l0.item())
    assert len(g0) == len(g1) > 0 and [g is None for g in g0] == [g is None for g in g1]
    assert sum(g is not None for g in g0) >= 2 * 7 * 2
    for a, b in zip(g1, g0):
        assert a is None or rel_norm(a, b) <= TOL


@pytest.fixture
def counted(monkeypatch):
    seen = {"forward": 0, "backward": 0}
    fwd, bwd = wide.forward, wide.backward_dx

    def forward(*a, **k):
        seen["forward"] += 1
        return fwd(*a, **k)

    def backward_dx(*a, **k):
        got = bwd(*a, **k)
        seen["backward"] += got is not None
        return got

    monkeypatch.setattr(wide, "forward", forward)
    monkeypatch.setattr(wide, "backward_dx", backward_dx)
    return seen


def test_wide_calls_equal_the_reference_and_run_from_the_second_forward(tiny_llama, counted):
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    counts = lorakit.optimize(fast, wide=True)
    assert counts["wide"] == 2 * 5  # q/k/v and gate/up of both layers; o and down read no norm
    q = fast.model.layers[0].self_attn.q_proj.base_layer.weight
    assert wide.room(q) == 16 and q.stride() == (64 + 16, 1)  # 3 terms of rank 4 = 12, rounded up to 8s
    assert torch.equal(q, ref.model.layers[0].self_attn.q_proj.base_layer.weight)
    _assert_same(ref, fast, _batch())  # the first forward asks the norms for the spare columns
    assert counted["forward"] == 0
    for seed in (1, 2):
        _assert_same(ref, fast, _batch(seed))
    assert counted["forward"] == 2 * 4  # two steps, both groups of both layers
    assert counted["backward"] == 2 * 3  # layer 0's q/k/v input needs no gradient: gH the plain way there
    assert fast.model.layers[0].input_layernorm.__dict__[norms.WANT_ATTR] == [16, 0]


def test_two_forwards_before_one_backward(tiny_llama, counted):
    """Each call writes s·B into the weights' spare columns; the base weight saved by the first call must not
    read as modified in place when the second call writes them again."""
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    _grads(fast, _batch())
    _assert_same(ref, fast, _batch(1), forwards=2)
    assert counted["forward"] == 2 * 4 and counted["backward"] == 2 * 3  # both forwards wide, both backwards


def test_switching_adapters_rewrites_the_spare_columns(tiny_llama, counted):
    ref = _adapt(_adapt(tiny_llama, "a"), "b", r=8)
    set_active(ref, "a")
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)  # room for adapter a's three rank-4 terms: 16
    for name in ("a", "b", "a"):  # b's rank 8 ×3 = 24 > 16: the plain form, then a again, wide
        set_active(ref, name)
        set_active(fast, name)
        _assert_same(ref, fast, _batch())
        _assert_same(ref, fast, _batch(1))
    assert counted["forward"] > 0


def test_a_layout_change_between_forward_and_backward_takes_the_plain_backward(tiny_llama, counted):
    ref = _adapt(_adapt(tiny_llama, "a"), "b")
    fast = copy.deepcopy(ref)
    for m in (ref, fast):
        set_active(m, "a")
    lorakit.optimize(fast, wide=True)
    ids = _batch()
    _grads(fast, ids)  # the norms now give spare columns
    l0, g0 = _grads(ref, ids)
    loss = fast(input_ids=ids, labels=ids).loss  # writes a's s·B beside W
    set_active(fast, ["a", "b"])
    fast(input_ids=ids, labels=ids)  # 24 > 16 columns: plain; a's columns stay
    set_active(fast, "b")
    forwards = counted["forward"]
    fast(input_ids=ids, labels=ids)  # the norms still give columns (one untaken output in a row)
    assert counted["forward"] == forwards + 4  # same layout as a: b's s·B written over a's
    set_active(fast, "a")
    before = counted["backward"]
    params = [p for p in fast.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    assert counted["backward"] == before  # the first graph saw b's columns: it computed gH the plain way
    assert [g is None for g in g0] == [g is None for g in g1] and sum(g is not None for g in g1) == 2 * 7 * 2
    for a, b in zip(g1, g0):
        assert a is None or rel_norm(a, b) <= TOL
    assert abs(loss.item() - l0.item()) <= TOL * abs(l0.item())


def test_replaced_storage_is_no_longer_wide_and_unoptimize_packs_back(tiny_llama, counted, tmp_path):
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    q = fast.model.layers[1].self_attn.q_proj.base_layer.weight
    q.data = q.data.clone()  # contiguous storage (as .to() or a load into new storage gives)
    assert wide.room(q) == 0
    for seed in (0, 1):
        _assert_same(ref, fast, _batch(seed))
    assert counted["forward"] == 3  # the second step: all but layer 1's q/k/v, which took the plain form
    fast.save_pretrained(tmp_path / "hf")  # transformers packs each tensor itself
    lorakit.unoptimize(fast)
    for name, p in fast.named_parameters():
        assert p.is_contiguous() and wide.WIDE_ATTR not in p.__dict__, name
        assert torch.equal(p, dict(ref.named_parameters())[name]), name
    assert all(norms.WANT_ATTR not in m.__dict__ for m in fast.modules())
    _assert_same(ref, fast, _batch(2))


def test_wide_option_is_checked_first_and_auto_is_on_for_one_cuda_process_only(tiny_llama, monkeypatch):
    opt = importlib.import_module("lorakit.fast.optimize")  # the module (lorakit.fast.optimize is also the function)

    model = _adapt(tiny_llama)
    with pytest.raises(lorakit.ConfigError, match="wide"):
        lorakit.optimize(model, wide="yes")
    assert all(p.is_contiguous() for p in model.parameters()) and model.model.layers[0].self_attn.q_proj.fast_path is None
    assert lorakit.optimize(model)["wide"] == 0  # on CPU "auto" is off: MKL runs the wide GEMMs slower
    monkeypatch.setattr(opt, "_on_device", lambda m, kind: kind == "cuda")  # as if on a GPU
    assert lorakit.optimize(model)["wide"] == 10
    lorakit.unoptimize(model)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    assert lorakit.optimize(model)["wide"] == 0  # in a process group: fully_shard would refuse strided weights
    assert lorakit.optimize(model, wide=True)["wide"] == 10


def test_training_forward_keeps_no_cache_and_skips_the_packed_check_only_where_the_cache_did(tiny_llama):
    """The fused-loss training forward passes use_cache=False (HF's default cache copies every layer's keys and
    values); where the caller passed no positions, mask or use_cache, transformers' packed-sequence check (a
    host-device sync) answers "not packed" without running, as HF's default cache made it do. Positions a caller
    passes without a mask keep the model's cache setting, which decides whether transformers looks for packed rows
    (the reference's mask); with use_cache=False they are checked, and packed ones give the packed mask."""
    from transformers import masking_utils

    from lorakit.fast import positions

    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    check = masking_utils.find_packed_sequence_indices  # the wrapper optimize() installed
    seen = []

    def spy(p, *a):
        got = check(p, *a)
        seen.append((positions._SCOPE.active(), got is None))
        return got

    ids = _batch()
    packed = torch.cat([torch.arange(8), torch.arange(8)])[None].expand(2, -1)
    try:
        masking_utils.find_packed_sequence_indices = spy
        out = fast(input_ids=ids, labels=ids)
        assert seen and all(skipped and none for skipped, none in seen)
        seen.clear()
        out_packed = fast(input_ids=ids, labels=ids, position_ids=packed)
        assert seen == []  # the model's cache is on: transformers does not look, as in the reference
        out_packed_nc = fast(input_ids=ids, labels=ids, position_ids=packed, use_cache=False)
        assert seen == [(False, False)]  # the caller's packed positions: checked, and found packed
        seen.clear()
        fast(input_ids=ids, labels=ids, use_cache=False)
        assert seen and not any(skipped for skipped, _ in seen)  # the caller's own use_cache=False: HF's check
    finally:
        masking_utils.find_packed_sequence_indices = check
    ref_out = ref(input_ids=ids, labels=ids)
    assert out.past_key_values is None and ref_out.past_key_values is not None
    assert abs(out.loss.item() - ref_out.loss.item()) <= TOL * abs(ref_out.loss.item())
    for got, use_cache in ((out_packed, None), (out_packed_nc, False)):
        want = ref(input_ids=ids, labels=ids, position_ids=packed, use_cache=use_cache)
        assert abs(got.loss.item() - want.loss.item()) <= TOL * abs(want.loss.item())
    assert abs(out_packed_nc.loss.item() - out_packed.loss.item()) > 1e-3  # the packed mask made a difference


def test_dropout_terms_in_the_wide_form_give_the_plain_fused_results(tiny_llama, counted):
    """lora_dropout > 0 with masks drawn from the call's seed: the mask engine writes those terms' columns of h beside
    x. Same seeds, same masks: the wide form must give the plain fused form's loss and gradients (that form is held
    to the reference by test_fast_dropout*.py)."""
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1,
                                                       init_lora_weights=False))
    tiny_llama.train()
    plain, fast = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    lorakit.optimize(plain, wide=False)
    assert lorakit.optimize(fast, wide=True)["wide"] == 10
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        l0, g0 = _grads(plain, _batch(seed))
        torch.manual_seed(seed)
        l1, g1 = _grads(fast, _batch(seed))
        assert abs(l0.item() - l1.item()) <= TOL * abs(l0.item())
        assert len(g0) == len(g1) == 2 * 7 * 2
        for a, b in zip(g1, g0):
            assert rel_norm(a, b) <= TOL
    assert counted["forward"] == 2 * 4 and counted["backward"] == 2 * 3


def test_dora_in_the_wide_form_equals_the_reference(tiny_llama, counted):
    """An output-scaled delta: the wide GEMM gives z = x·Wᵀ + s·h·Bᵀ (its bias after the scale), and backward's
    one GEMM per output reads dZ = dY ⊙ f."""
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                       init_lora_weights=False))
    ref = tiny_llama.train()
    with torch.no_grad():  # magnitudes away from the norms, so that f ≠ 1 shows
        for name, p in ref.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    fast = copy.deepcopy(ref)
    assert lorakit.optimize(fast, wide=True)["wide"] == 10
    for seed in (0, 1, 2):
        _assert_same(ref, fast, _batch(seed))
    assert counted["forward"] == 2 * 4 and counted["backward"] == 2 * 3


def test_unload_after_optimize_leaves_a_plain_model_safetensors_can_save(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    _grads(fast, _batch())
    merged_ref = lorakit.unload(ref)
    merged = lorakit.unload(fast)
    assert all(p.is_contiguous() and wide.WIDE_ATTR not in p.__dict__ for p in merged.parameters())
    tensors = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}  # tied to the embeddings
    save_file(tensors, tmp_path / "m.safetensors")  # refuses a strided tensor
    got = load_file(tmp_path / "m.safetensors")
    for name, p in merged_ref.state_dict().items():
        if name in got:
            assert torch.allclose(got[name], p, rtol=0, atol=1e-6), name


def test_wide_outputs_may_be_changed_in_place(tiny_llama, counted):
    """Outputs are fresh tensors, as in the plain form: a forward hook that scales q in place works."""
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    for m in (ref, fast):
        m.model.layers[1].self_attn.q_proj.register_forward_hook(lambda mod, inp, out: out.mul_(0.5))
    for seed in (0, 1):
        _assert_same(ref, fast, _batch(seed))
    assert counted["forward"] == 4


def test_a_norm_asked_for_columns_still_compiles_in_one_graph():
    """Under torch.compile the norm gives no spare columns (its recipes are off there): fullgraph holds after eager
    calls raised its request (torch 2.13; 2.11's dynamo breaks elsewhere, so there only the results are checked)."""
    from torch import nn

    from lorakit.fast.lora_linear import fused_linears
    from lorakit.fast.norms import rms_norm

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
            self.w = nn.Parameter(torch.ones(16))
            self.want = [8, 0]

        def forward(self, x):
            q, k, v = fused_linears(rms_norm(x, self.w, 1e-6, "llama", self.want), [self.q, self.k, self.v])
            return (q[..., :8] * k + v).sum()

    torch.manual_seed(0)
    m = Block()
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v"],
                                              init_lora_weights=False))
    x = torch.randn(2, 3, 16, requires_grad=True)
    ref = m(x)  # eager: a wide output (no weight is wide here, so the fused call takes the plain form)
    assert m.want == [8, 1]  # one wide output no reader took: the next eager call still gives the columns
    fullgraph = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
    out = torch.compile(m, backend="aot_eager", fullgraph=fullgraph)(x)
    assert rel_norm(out, ref) <= 1e-6


def test_packing_back_between_forward_and_backward(tiny_llama, counted):
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    ids = _batch()
    _grads(fast, ids)
    loss = fast(input_ids=ids, labels=ids).loss  # wide
    lorakit.unoptimize(fast)  # the weights packed back before this graph's backward
    params = [p for p in fast.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(loss, params)
    l0, g0 = _grads(ref, ids)
    assert counted["forward"] == 4 and counted["backward"] == 0
    assert abs(loss.item() - l0.item()) <= TOL * abs(l0.item())
    for a, b in zip(g1, g0):
        assert rel_norm(a, b) <= TOL


def test_dora_under_checkpointing_whichever_form_forward_and_recompute_take(tiny_llama, counted, monkeypatch):
    """Non-reentrant checkpointing runs backward with forward's ctx and recompute's saved tensors, and the two may
    take different forms (a norm gives columns to the recompute only). The plain form leaves out of z a term the
    scale kernels add (takes_up, what CUDA decides; forced here), the wide form keeps it in: which z lack their
    term must come with the saved tensors. A forward with the adapters disabled between steps (a reference
    model's pass) must not break that either."""
    from lorakit.fast import lora_linear

    monkeypatch.setattr(lora_linear, "takes_up", lambda *a: True)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                       init_lora_weights=False))
    ref = tiny_llama.train()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True, checkpoint=True)
    for seed in range(4):
        _assert_same(ref, fast, _batch(seed))
        with torch.no_grad(), lorakit.disabled(fast):
            fast(input_ids=_batch(seed))
    assert counted["backward"] >= 3 * 3  # wide from the second step on


def test_the_wide_form_stays_on_with_other_forwards_between_steps(tiny_llama, counted):
    """A norm stops giving columns only after several untaken outputs in a row, and gives none where nothing could
    take them (inference mode, an autocast to another dtype): other passes between training steps leave the
    training steps wide."""
    ref = _adapt(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, wide=True)
    _grads(fast, _batch())
    for seed, between in enumerate(("disabled", "inference", "autocast", "disabled")):
        before = counted["forward"]
        _assert_same(ref, fast, _batch(seed))
        assert counted["forward"] == before + 4, between
        if between == "disabled":
            with torch.no_grad(), lorakit.disabled(fast):
                fast(input_ids=_batch(seed))
        elif between == "inference":
            with torch.inference_mode():
                fast(input_ids=_batch(seed))
        else:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                fast(input_ids=_batch(seed))
        untaken = fast.model.layers[0].input_layernorm.__dict__[norms.WANT_ATTR][1]
        assert untaken == (1 if between == "disabled" else 0), between  # no buffer given where none is taken


def _bf16_plain_and_wide(model):
    """The bf16 model adapted, as two optimized copies: the plain fused form and the wide one."""
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model = model.to(torch.bfloat16).train()
    plain, fast = copy.deepcopy(model), copy.deepcopy(model)
    lorakit.optimize(plain, wide=False)
    lorakit.optimize(fast, wide=True)
    return plain, fast


def test_an_autocast_that_casts_nothing_keeps_the_wide_form(tiny_llama, counted):
    """A bf16 model under bf16 autocast: nothing is cast, so the recipe and the wide form stay (checked against the
    plain fused form under the same autocast, bf16 tolerance)."""
    plain, fast = _bf16_plain_and_wide(tiny_llama)
    for seed in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l0, g0 = _grads(plain, _batch(seed))
            l1, g1 = _grads(fast, _batch(seed))
        assert abs(l0.item() - l1.item()) <= 2e-2 * abs(l0.item())
        for a, b in zip(g1, g0):
            assert rel_norm(a, b) <= 5e-2
    assert counted["forward"] == 4 and counted["backward"] == 3


def test_garbage_in_the_wide_inputs_spare_columns_never_reaches_the_outputs(tiny_llama, monkeypatch):
    """torch's CPU bf16 GEMM reads K = in + R rounded up to a multiple of 8 (here 64 + 12 → 80): the input buffer's
    spare columns are zeroed, so NaN left in a fresh buffer cannot reach the outputs (it did, about one run in two)."""
    from lorakit.fast import norms

    def poisoned(x, rows, cols):
        return torch.full((rows, cols), float("nan"), dtype=x.dtype, device=x.device)

    monkeypatch.setattr(norms, "wide_buffer", poisoned)
    plain, fast = _bf16_plain_and_wide(tiny_llama)
    for seed in (0, 1, 2):  # the wide form from the second forward on
        l0, _ = _grads(plain, _batch(seed))
        l1, grads = _grads(fast, _batch(seed))
        assert torch.isfinite(l1) and abs(l0.item() - l1.item()) <= 2e-2 * abs(l0.item())
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
