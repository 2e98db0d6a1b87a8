"""optimize(checkpoint=...): a block's forward records no autograd graph (its input is all it keeps), and its
recompute gives the gradients the un-checkpointed model gives, through loss.backward() and torch.autograd.grad,
under autocast, and for a block argument that needs a gradient of its own (CPU, float32 unless said)."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from support import one_thread, rel_norm  # noqa: F401

MODES = [True, "offload"]


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, shift=None):
        y = self.fc2(torch.relu(self.fc1(h)))  # [N, d]
        return h + (y if shift is None else y * shift)


class Net(nn.Module):
    """Blocks only: whatever the forward saves for backward, a block saved it."""

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))  # trained, read by every block through `shift`

    def forward(self, x, shifted: bool = False):
        for block in self.blocks:
            x = block(x, shift=self.scale * 2 if shifted else None)
        return x


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    lorakit.add_adapter(net, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    net.scale.requires_grad_(True)  # add_adapter froze it; trained like a modules_to_save tensor
    return net.train()


def _x(seed=0, requires_grad=True):
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def _grads(net, x, **kw):
    loss = net(x, **kw).square().mean()
    params = [p for p in net.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [x, *params], allow_unused=True)  # unshifted: scale unused


def _adapted_pair(net_cls, mode):
    """(reference, optimized with checkpoint=mode) copies of a fresh net_cls() with adapters on fc1/fc2 and a
    trained `scale`."""
    torch.manual_seed(0)
    ref = net_cls()
    lorakit.add_adapter(ref, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    ref.scale.requires_grad_(True)
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, checkpoint=mode)
    return ref, fast


def _assert_same_grads(ref, fast, x, **kw):
    l0, g0 = _grads(ref, x, **kw)
    l1, g1 = _grads(fast, x, **kw)
    assert rel_norm(l1, l0) <= 1e-6
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None) and (a is None or rel_norm(a, b) <= 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpointed_forward_saves_only_each_block_input(mode):
    net = _net()
    lorakit.optimize(net, checkpoint=mode)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = net(_x())
    assert saved == ([(6, 16)] * 3 if mode is True else [])  # offload: the input went to host memory
    out.sum().backward()
    plain = _net()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        plain(_x())
    assert len(saved) > 3 * 4  # what the hooks see without checkpointing: every block's activations


@pytest.mark.parametrize("mode", MODES)
def test_autograd_grad_through_checkpointed_blocks_equals_the_plain_model(mode):
    ref = _net()
    fast = copy.deepcopy(ref)
    assert lorakit.optimize(fast, checkpoint=mode)["checkpoint"] == 3
    for seed in range(2):
        l0, g0 = _grads(ref, _x(seed))
        l1, g1 = _grads(fast, _x(seed))
        assert rel_norm(l1, l0) <= 1e-6
        assert len(g1) == len(g0) == 1 + 1 + 3 * 4  # the input, `scale` (unused: None), A and B of six linears
        assert g0[1] is None and g1[1] is None
        for a, b in zip(g1[2:] + g1[:1], g0[2:] + g0[:1]):
            assert rel_norm(a, b) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_a_block_argument_that_needs_a_gradient_gets_it(mode, fallbacks):
    """`shift` carries a trained tensor into every block: it is an input of the block's node, and the gradient
    reaches `scale` as it does without checkpointing."""
    ref = _net()
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, checkpoint=mode)
    l0, g0 = _grads(ref, _x(), shifted=True)
    l1, g1 = _grads(fast, _x(), shifted=True)
    assert rel_norm(l1, l0) <= 1e-6
    assert g0[1].abs().sum() > 0  # scale's
    for a, b in zip(g1, g0):
        assert rel_norm(a, b) <= 1e-5
    assert fallbacks == []


@pytest.mark.parametrize("mode", MODES)
def test_an_argument_changed_in_place_before_backward_is_refused(mode):
    net = _net()
    lorakit.optimize(net, checkpoint=mode)
    shift = net.scale * 2
    out = net.blocks[0](_x(), shift=shift)
    with torch.no_grad():
        shift.add_(1.0)  # what the block's recompute would read
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_several_backwards_through_an_argument_that_needs_a_gradient(fallbacks):
    ref = _net()
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, checkpoint=True)
    ref(_x(), shifted=True).square().mean().backward()
    loss = fast(_x(), shifted=True).square().mean()
    sums = []
    for _ in range(2):
        fast.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        sums.append([p.grad.double().sum().item() for p in fast.parameters() if p.requires_grad])
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            if b.grad is not None:
                assert rel_norm(a.grad, b.grad) <= 1e-5, name
    assert sums[0] == sums[1]
    assert fallbacks == []


class BiasBlock(Block):
    def forward(self, h, bias):
        return h + self.fc2(torch.relu(self.fc1(h + bias)))  # bias: [d], the same leaf for every block


class BiasNet(Net):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(BiasBlock(16) for _ in range(3))

    def forward(self, x, bias):
        for block in self.blocks:
            x = block(x, bias)
        return x


@pytest.mark.parametrize("mode", MODES)
def test_autograd_grad_reaches_a_leaf_passed_to_every_block(mode, fallbacks):
    ref, fast = _adapted_pair(BiasNet, mode)
    bias = torch.linspace(-1, 1, 16).requires_grad_(True)
    want, = torch.autograd.grad(ref(_x(requires_grad=False), bias).square().mean(), [bias])
    got, = torch.autograd.grad(fast(_x(requires_grad=False), bias).square().mean(), [bias])
    assert rel_norm(got, want) <= 1e-5 and bias.grad is None
    assert fallbacks == []


@pytest.mark.parametrize("mode", MODES)
def test_the_recompute_runs_under_the_forward_autocast(mode):
    ref = _net()
    fast = copy.deepcopy(ref)
    lorakit.optimize(ref)  # the same fused path, not checkpointed
    lorakit.optimize(fast, checkpoint=mode)
    x = _x(requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out0 = ref(x)
        out1 = fast(x)
    assert out1.dtype == out0.dtype
    (out0.float().square().mean()).backward()
    (out1.float().square().mean()).backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        if b.grad is not None:
            assert a.grad is not None and a.grad.dtype == b.grad.dtype, name
            assert rel_norm(a.grad, b.grad) <= 1e-6, name  # the same bfloat16 ops in the same order


def test_a_block_input_changed_in_place_before_backward_is_refused():
    net = _net()
    lorakit.optimize(net, checkpoint=True)
    h = net.blocks[0](_x())
    out = net.blocks[1](h)
    with torch.no_grad():
        h.add_(1.0)  # the input block 1 would recompute from
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class PairBlock(Block):
    """Returns (hidden, residual); the next block reads both, so both carry gradients."""

    def forward(self, h, residual=None, extras=None):
        y = self.fc2(torch.relu(self.fc1(h if residual is None else h + residual)))
        if extras is not None:
            y = y * extras["gate"]
        return h + y, y


class PairNet(Net):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(PairBlock(16) for _ in range(3))

    def forward(self, x, mode="pairs"):
        residual = None
        for block in self.blocks:
            if mode == "pairs":  # the second output feeds the next block
                x, residual = block(x, residual)
            elif mode == "alias":  # the block's own input passed again by keyword
                x = block(x, residual=x)[0]
            elif mode == "view":  # a view of it
                x = block(x, residual=x.view(x.shape))[0]
            else:  # a trained tensor inside a dict argument
                x = block(x, extras={"gate": self.scale})[0]
        return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["pairs", "alias", "view", "dict"])
def test_gradients_through_a_blocks_other_outputs_and_arguments(mode, call, fallbacks):
    """The residual output feeds the next block's node; the hidden state again (or a view of it), or a trained
    tensor inside a dict, goes to torch's checkpoint."""
    ref, fast = _adapted_pair(PairNet, mode)
    for seed in range(2):
        _assert_same_grads(ref, fast, _x(seed), mode=call)
    assert len(fallbacks) == (0 if call == "pairs" else 2 * 3)


def test_frozen_blocks_before_the_first_trained_one_are_not_recomputed():
    net = _net()
    for block in net.blocks[:2]:
        for p in block.parameters():
            p.requires_grad_(False)
    lorakit.optimize(net, checkpoint=True)
    calls = []
    for i, block in enumerate(net.blocks):  # a recompute calls the block's forward, which calls fc1
        block.fc1.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    for _ in range(2):
        calls.clear()
        net(_x(requires_grad=False)).sum().backward()
    assert calls == [0, 1, 2, 2]  # the forward, then block 2's recompute only


def test_a_backward_outside_the_per_row_block_of_its_forward_is_refused():
    net = _net()
    lorakit.add_adapter(net, lorakit.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False), "b")
    lorakit.optimize(net, checkpoint=True)
    x = _x(requires_grad=False).view(2, 3, 16)
    with lorakit.per_row(net, ["default", "b"]):
        net(x).sum().backward()  # first calls, then the one under test
        out = net(x).sum()
    with pytest.raises(RuntimeError, match="adapters changed between its forward and its backward"):
        out.backward()


class DictBlock(Block):
    def forward(self, h):
        return {"hidden": super().forward(h)}


class DictNet(Net):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(DictBlock(16) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)["hidden"]
        return x


@pytest.mark.parametrize("mode", MODES)
def test_a_block_returning_a_dict_runs_under_torchs_checkpoint(mode):
    ref, fast = _adapted_pair(DictNet, mode)
    for seed in range(2):  # the first call finds the form (and runs the block again), the second knows it
        _assert_same_grads(ref, fast, _x(seed))


class AuxBlock(Block):
    """Returns (h, an op of h that keeps h for its backward, the block's own buffer)."""

    def __init__(self, d: int):
        super().__init__(d)
        self.register_buffer("table", torch.linspace(0, 1, d))

    def forward(self, h):
        out = super().forward(h)  # a residual add: alone, its values could be freed before backward
        return out, out.sin(), self.table


class AuxNet(Net):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(AuxBlock(16) for _ in range(3))

    def forward(self, x):
        total = 0
        for block in self.blocks:
            x, aux, table = block(x)
            total = total + (aux * table).sum()
        return x + total


@pytest.mark.parametrize("mode", MODES)
def test_other_outputs_keep_what_their_backward_reads_and_buffers_stay_untouched(mode):
    ref, fast = _adapted_pair(AuxNet, mode)
    _assert_same_grads(ref, fast, _x())
    assert all(not b.table.requires_grad and b.table.grad_fn is None for b in fast.blocks)


def test_offloaded_block_outputs_are_not_held_after_the_forward():
    import gc
    import weakref

    net = _net()
    lorakit.optimize(net, checkpoint="offload")
    h, storages = _x(), []
    for block in net.blocks:
        h = block(h)  # each output is the next block's input, which went to host memory
        storages.append(weakref.ref(h.untyped_storage()))  # (not data pointers: a freed address is taken again)
    gc.collect()
    assert [ref() is None for ref in storages[:-1]] == [True, True]  # nothing holds an earlier block's output
    h.sum().backward()


def test_checkpoint_units_take_the_outermost_layers_or_the_longest_list():
    from lorakit.core.blocks import checkpoint_units

    from transformers.modeling_layers import GradientCheckpointingLayer

    net = _net()
    assert checkpoint_units(net) == list(net.blocks)  # no transformers layers: the longest list of one class

    class Inner(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Outer(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([Outer(), Outer()])  # each holds another transformers layer
            self.decoder = nn.ModuleList([Inner(), Inner(), Inner()])  # the longest list, of another class

    model = Model()
    assert checkpoint_units(model) == [*model.encoder, *model.decoder]  # the outermost ones, every stack
    assert checkpoint_units(model.encoder[0]) == [model.encoder[0]]  # the root itself
