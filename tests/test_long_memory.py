"""The long-context path allocates nothing quadratic in the sequence and nothing of the MLP's width over the
whole sequence: every tensor an op makes during a training step is recorded (TorchDispatchMode) and
measured against T (CPU, a tiny Llama, batch 1)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.fast import checkpoint as ckpt
from support import one_thread  # noqa: F401

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T = 256  # T·T = 65536 > T·intermediate = 45056 > T·vocab = 24576: each term shows on its own


class _Sizes(TorchDispatchMode):
    """Records each op's name, the largest tensor it returned (elements) and the attention calls' arguments."""

    def __init__(self):
        super().__init__()
        self.largest: dict[str, int] = {}
        self.attention: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if sizes:
            self.largest[name] = max(self.largest.get(name, 0), max(sizes))
        if "scaled_dot_product" in name and "backward" not in name:
            names = [a.name for a in func._schema.arguments]
            self.attention.append((name, {**dict(zip(names, args)), **kwargs}))
        return out


@pytest.fixture
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _model(model, **optimize_kw):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.train()
    lorakit.optimize(model, checkpoint="offload", **optimize_kw)
    return model


@pytest.mark.parametrize("with_mask", [False, True])
def test_no_tensor_of_t_by_t_elements_in_a_training_step(llama, with_mask):
    # max_position_embeddings 64 < T: positions beyond it are computed, not capped (RoPE has no table)
    model = _model(llama, tile_mlp=32)
    ids = torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if with_mask:  # what a padded batch of one row carries: all ones, so no mask is needed
        batch["attention_mask"] = torch.ones_like(ids)
    sizes = _Sizes()
    with sizes:
        model(**batch).loss.backward()
    worst = max(sizes.largest, key=sizes.largest.get)
    assert sizes.largest[worst] < T * T, (worst, sizes.largest[worst])
    # the MLP's [*, intermediate] tensors exist for one tile of 32 rows at a time, never the whole sequence
    intermediate = model.config.intermediate_size
    wide = [n for n, size in sizes.largest.items() if size >= T * intermediate]
    assert not wide, wide
    assert sizes.attention, "attention did not go through scaled_dot_product_attention"
    for name, arguments in sizes.attention:  # causal by flag, no mask tensor at all
        assert arguments.get("attn_mask") is None and arguments.get("is_causal") is True, name


def test_the_recomputed_block_output_is_freed_before_its_backward(llama, monkeypatch):
    """The residual add's output is not read by its backward: the offloaded block drops its values."""
    model = _model(llama)
    freed = []
    real = ckpt._drop_values_if_unread

    def spy(out):
        real(out)
        freed.append(out.untyped_storage().nbytes())

    monkeypatch.setattr(ckpt, "_drop_values_if_unread", spy)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert freed == [0, 0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_a_block_whose_input_stays_unchanged_may_overlap_its_copy(llama):
    """Offloaded copies overlap a block's compute only once its first call showed it leaves its input alone."""
    model = _model(llama)
    layers = list(model.model.layers)
    assert not any(ckpt.OVERLAP_ATTR in layer.__dict__ for layer in layers)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.__dict__[ckpt.OVERLAP_ATTR] is True for layer in layers)
    lorakit.unoptimize(model)
    assert not any(ckpt.OVERLAP_ATTR in layer.__dict__ for layer in layers)
