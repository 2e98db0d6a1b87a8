"""AdaLoRA: the cubic budget schedule, the importance-based allocator, PEFT's orthogonality loss, pruned saves
(rank_pattern of booleans) that load back, and an allocator state that resumes exactly."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from support import randomise_adapters


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _adalora_model(**kwargs):
    torch.manual_seed(0)
    model = _Mlp().eval()
    cfg = dict(init_r=4, target_r=2, total_step=8, tinit=2, tfinal=2, target_modules=["up", "down", "head"]) | kwargs
    lorakit.add_adapter(model, lorakit.AdaLoraConfig(**cfg)).eval()
    return model


def _train(model, steps, lr=0.05, first_step=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = lorakit.training_hooks(model)
    torch.manual_seed(1)
    x, target = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for step in range(first_step, first_step + steps):
        loss = F.cross_entropy(model(x), target) + sum(h.extra_loss() for h in hooks)
        loss.backward()
        opt.step()
        for h in hooks:
            h.after_step(step)
        opt.zero_grad()
    return hooks


def test_adalora_budget_schedule_is_cubic_between_tinit_and_the_final_phase():
    model = _adalora_model(total_step=20, tinit=3, tfinal=5, deltaT=2)
    (hook,) = lorakit.training_hooks(model)
    assert (hook.init_bgt, hook.target_bgt) == (12, 6)
    budgets = [hook.budget_schedule(s) for s in range(0, 21)]
    assert all(b == (12, False) for b, _ in zip(budgets[:4], range(4)))
    assert all(b == (6, True) for b in budgets[16:])
    middle = budgets[4:16]
    assert [b for b, _ in middle] == sorted((b for b, _ in middle), reverse=True)
    assert [m for _, m in middle] == [s % 2 == 0 for s in range(4, 16)]
    step = 9  # the cubic: (init − target)·(1 − (step − tinit)/(total − tfinal − tinit))³ + target
    assert middle[step - 4][0] == int(6 * (1 - 6 / 12) ** 3 + 6)


def test_adalora_allocator_prunes_to_target_and_records_pattern():
    model = _adalora_model()
    config_before = lorakit.get_config(model, "default")
    _train(model, 8)
    deltas = [layer.deltas["default"] for _, layer in lorakit.adapted_layers(model)]
    assert sum(int(d.rank_mask.sum()) for d in deltas) == 6  # target_r · 3 layers
    for d in deltas:
        assert torch.all(d.lora_E[~d.rank_mask] == 0)  # re-masked after every step of the final phase
    pattern = lorakit.get_config(model, "default").rank_pattern
    assert pattern == {f"{name}.lora_E": layer.deltas["default"].rank_mask.tolist()
                       for name, layer in lorakit.adapted_layers(model)}
    assert config_before.rank_pattern is None  # the caller's config object is not mutated


def test_adalora_schedule_does_not_depend_on_the_loop_s_step_numbering():
    one_based, zero_based = _adalora_model(), _adalora_model()
    _train(one_based, 8)
    _train(zero_based, 8, first_step=0)  # lorakit's own loop counts from 0
    pattern = lorakit.get_config(one_based, "default").rank_pattern
    assert pattern is not None and pattern == lorakit.get_config(zero_based, "default").rank_pattern


def test_adalora_orthogonality_loss_is_peft_s():
    model = _adalora_model(orth_reg_weight=0.3)
    randomise_adapters(model)
    (hook,) = lorakit.training_hooks(model)
    norms = []
    for _, layer in lorakit.adapted_layers(model):
        d = layer.deltas["default"]
        norms.append(torch.linalg.norm(d.lora_A @ d.lora_A.t() - torch.eye(4)))
        norms.append(torch.linalg.norm(d.lora_B.t() @ d.lora_B - torch.eye(4)))
    assert hook.extra_loss().item() == pytest.approx(0.3 * sum(norms).item() / len(norms), rel=1e-5)


def test_adalora_pruned_save_drops_ranks_and_loads_back(tmp_path):
    model = _adalora_model()
    _train(model, 8)
    lorakit.save_adapter(model, tmp_path / "a")
    saved = lorakit.read_config(tmp_path / "a")
    assert saved.rank_pattern == lorakit.get_config(model, "default").rank_pattern
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, layer in lorakit.adapted_layers(model):
        kept = int(layer.deltas["default"].rank_mask.sum())
        assert tensors[f"base_model.model.{name}.lora_A"].shape == (kept, layer.ops.in_features)
        assert tensors[f"base_model.model.{name}.lora_B"].shape == (layer.ops.out_features, kept)
    torch.manual_seed(0)
    fresh = _Mlp().eval()
    lorakit.load_adapter(fresh, tmp_path / "a")
    fresh.eval(), model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), rtol=1e-5, atol=1e-6)
    lorakit.save_adapter(fresh, tmp_path / "b")  # a loaded pruned adapter saves back the same file
    again = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert lorakit.read_config(tmp_path / "b").rank_pattern == saved.rank_pattern


def test_adalora_allocator_state_resumes_exactly():
    """Steps 1–8 in one go == steps 1–4, a checkpoint (parameters + hook state), then 5–8 in a new model."""
    straight = _adalora_model()
    _train(straight, 8)
    first = _adalora_model()
    (hook,) = _train(first, 4)
    state, params = hook.state_dict(), {n: p.detach().clone() for n, p in first.named_parameters()}
    resumed = _adalora_model()
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(params[n])
    opt = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    (hook2,) = lorakit.training_hooks(resumed)
    hook2.load_state_dict(state)
    torch.manual_seed(1)
    x, target = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for step in range(5, 9):
        (F.cross_entropy(resumed(x), target) + hook2.extra_loss()).backward()
        opt.step()
        hook2.after_step(step)
        opt.zero_grad()
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n
    assert lorakit.get_config(resumed, "default").rank_pattern == lorakit.get_config(straight, "default").rank_pattern


def test_training_hooks_only_for_adalora():
    model = nn.Sequential(nn.Linear(4, 4))
    lorakit.add_adapter(model, lorakit.LoHaConfig(r=2, target_modules=["0"]))
    assert lorakit.training_hooks(model) == []


def test_adalora_layer_pruned_to_zero_ranks_saves_reloads_and_runs(tmp_path):
    """The budget can leave a layer no rank at all; the saved file then has rank 0 there and must still load."""
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model = build()
    base_state = copy.deepcopy(model.state_dict())
    cfg = lorakit.AdaLoraConfig(init_r=4, target_r=1, total_step=12, tinit=1, tfinal=2, deltaT=1,
                                target_modules=["0", "2"])
    lorakit.add_adapter(model, cfg)
    hooks = lorakit.training_hooks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss = loss + sum(e for e in (h.extra_loss() for h in hooks) if e is not None)
        loss.backward()
        opt.step()
        for h in hooks:
            h.after_step(step)
        opt.zero_grad()
    lorakit.save_adapter(model, tmp_path)
    kept = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert any(not any(mask) for mask in kept.values()), kept  # the case under test: a layer with no rank left
    fresh = build()
    fresh.load_state_dict(base_state)
    lorakit.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)
