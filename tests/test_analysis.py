"""lorakit.analyze: the figures are mathematically right (spectrum, φ, amplification, suggest-rank, truncate)."""

import json
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.analysis.similarity import subspace_similarity
from lorakit.analysis.spectrum import spectrum_dense, spectrum_from_factors
from lorakit.analysis.truncate import relative_distance
from variants import LAYER_CASES, matrix
from support import one_thread  # noqa: F401


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def _linear_model(out=24, n=20, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, out, bias=False))


@torch.no_grad()
def _lora_with(model, b: torch.Tensor, a: torch.Tensor, alpha: float, name="default"):
    """A LoRA adapter on model[0] whose factors are exactly b [out, r] and a [r, n]."""
    cfg = lorakit.LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["0"])
    lorakit.add_adapter(model, cfg, name=name)
    delta = model[0].deltas[name]
    delta.lora_B.copy_(b)
    delta.lora_A.copy_(a)
    return delta


def _dense_canonical(layer, name="default") -> torch.Tensor:
    dw = layer.deltas[name].delta_weight(layer).detach()
    return layer.ops.from_layer_layout(dw).reshape(layer.ops.out_features, -1).double()


# --- the SVD ---------------------------------------------------------------------------------------------
def test_factor_svd_equals_dense_svdvals_and_reconstructs():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    spec = spectrum_from_factors(b, a, 0.7)
    dense = 0.7 * b.double() @ a.double()
    torch.testing.assert_close(spec.s, torch.linalg.svdvals(dense)[:6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(spec.u @ torch.diag(spec.s) @ spec.v.t(), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(spec.u.t() @ spec.u, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(spec.v.t() @ spec.v, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    assert spec.from_factors and spec.rank == 6
    # more rank than output rows: the QR is [out, out] and the spectrum has out values
    spec = spectrum_from_factors(torch.randn(3, 6, generator=g), torch.randn(6, 30, generator=g), 1.0)
    assert len(spec.s) == 3 and spec.rank == 3


def test_rank_one_delta_has_exactly_one_nonzero_singular_value():
    u, v = torch.randn(24, 1), torch.randn(1, 20)
    b = u @ torch.tensor([[1.0, 2.0, -1.0, 0.5]])  # 4 columns, all multiples of u: rank 1
    a = torch.randn(4, 20)
    spec = spectrum_from_factors(b, a, 2.0)
    assert spec.rank == 1
    assert spec.s[1:].max() <= 1e-9 * spec.s[0]
    assert spec.effective_rank == pytest.approx(1.0, abs=1e-6)
    assert spec.energy_rank(0.999999) == 1
    dense = spectrum_dense(u @ v)
    assert dense.rank == 1 and not dense.from_factors
    assert dense.effective_rank == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("variant,case", matrix(without=("experts",)))  # analysis refuses expert stacks
def test_spectrum_matches_delta_weight_for_every_variant_and_layer(variant, case, tmp_path):
    """Every variant x layer type: the reported σ equal svdvals of the protocol's dense ΔW, and U·Σ·Vᵀ is ΔW in
    the canonical orientation. From the directory alone the same spectrum comes out, or (ΔW depends on W,
    as DoRA's does) a clear error asking for the base."""
    model = case.build()
    lorakit.add_adapter(model, variant.make(case.targets, False))
    result = lorakit.analyze(model)
    layers = dict(lorakit.adapted_layers(model))
    for la in result.layers:
        dense = _dense_canonical(layers[la.path])
        k = len(la.spectrum.s)
        torch.testing.assert_close(la.spectrum.s, torch.linalg.svdvals(dense)[:k], rtol=1e-5, atol=1e-6)
        rebuilt = la.spectrum.u @ torch.diag(la.spectrum.s) @ la.spectrum.v.t()
        torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-5)
        assert la.spectrum.from_factors == (variant.name == "lora")
        assert la.base is not None  # a model has its base weights
    lorakit.save_adapter(model, tmp_path / "a")
    try:
        alone = lorakit.analyze(tmp_path / "a")
    except lorakit.ConfigError as e:
        assert "--base" in str(e)
        assert variant.name == "dora", f"{variant.name} should not need the base model"
        return
    assert [la.path for la in alone.layers] == [la.path for la in result.layers]
    for x, y in zip(alone.layers, result.layers):
        assert x.shape == y.shape and x.base is None
        torch.testing.assert_close(x.spectrum.s, y.spectrum.s, rtol=1e-6, atol=1e-7)


# --- φ ------------------------------------------------------------------------------------------------
def test_subspace_similarity_on_a_constructed_example():
    eye = torch.eye(6, dtype=torch.float64)
    u1 = eye[:, [0, 1, 2, 3]]
    u2 = eye[:, [0, 4, 1, 5]]
    phi = subspace_similarity(u1, u2)
    assert phi.shape == (4, 4)
    assert phi[0, 0] == pytest.approx(1.0)  # the top directions coincide
    assert phi[1, 1] == pytest.approx(0.5)  # {e0, e1} vs {e0, e4}: one of two
    assert phi[1, 2] == pytest.approx(1.0)  # {e0, e1} inside {e0, e4, e1}
    assert phi[3, 3] == pytest.approx(0.5)  # {e0..e3} vs {e0, e4, e1, e5}
    assert phi[2, 0] == pytest.approx(1.0)  # min(i, j) = 1: e0 is inside {e0, e1, e2}


def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal(tmp_path):
    case = next(c for c in LAYER_CASES if c.kind == "linear")
    model = case.build()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=case.targets, init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "a")
    result = lorakit.analyze(tmp_path / "a", compare=tmp_path / "a")
    for la in result.layers:
        assert set(la.phi) == {"A", "delta_in", "delta_out"}
        for basis, phi in la.phi.items():
            assert phi.shape == (4, 4)
            torch.testing.assert_close(torch.diagonal(phi), torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)
            assert float(phi.min()) >= 0 and float(phi.max()) <= 1


# --- ΔW vs W ------------------------------------------------------------------------------------------
def test_amplification_and_w_similarity_on_a_constructed_example():
    """W has singular values 10, 5, 1, 0.5 on known directions; ΔW = 2·e₂f₂ᵀ lies on W's third direction."""
    out, n = 6, 5
    eu, ev = _orthonormal(out, 4, 0), _orthonormal(n, 4, 1)
    w = eu @ torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64)) @ ev.t()
    model = _linear_model(out, n)
    with torch.no_grad():
        model[0].weight.copy_(w)
    _lora_with(model, (2.0 * eu[:, 2:3]).float(), ev[:, 2:3].t().float(), alpha=1.0)  # r=1, s=1
    base = lorakit.analyze(model).layers[0].base
    assert base["k"] == 1
    assert base["proj_delta"] == pytest.approx(1.0, rel=1e-5)  # W's σ on that direction
    assert base["amplification"] == pytest.approx(2.0, rel=1e-5)  # ‖ΔW‖ = 2
    assert base["proj_w_top"] == pytest.approx(10.0, rel=1e-6)
    w_norm = math.sqrt(100 + 25 + 1 + 0.25)
    assert base["w_fro_norm"] == pytest.approx(w_norm, rel=1e-6)
    assert base["proj_random"] == pytest.approx(w_norm / math.sqrt(out * n), rel=1e-6)
    assert base["overlap_out"] == pytest.approx(0.0, abs=1e-6) and base["overlap_in"] == pytest.approx(0.0, abs=1e-6)

    aligned = _linear_model(out, n)  # ΔW on W's top direction: no amplification beyond W's own scale
    with torch.no_grad():
        aligned[0].weight.copy_(w)
    _lora_with(aligned, (3.0 * eu[:, :1]).float(), ev[:, :1].t().float(), alpha=1.0)
    base = lorakit.analyze(aligned).layers[0].base
    assert base["amplification"] == pytest.approx(0.3, rel=1e-5)
    assert base["overlap_out"] == pytest.approx(1.0, rel=1e-5) and base["overlap_in"] == pytest.approx(1.0, rel=1e-5)


def test_random_projection_baseline_is_the_rms_over_random_subspaces():
    from lorakit.analysis.similarity import base_similarity

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    spec = spectrum_from_factors(torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g), 1.0)
    expected = base_similarity(spec, w)["proj_random"]
    u = torch.linalg.qr(torch.randn(4000, 12, 3, generator=g, dtype=torch.float64))[0]  # Haar-random bases
    v = torch.linalg.qr(torch.randn(4000, 9, 3, generator=g, dtype=torch.float64))[0]
    mean_sq = torch.linalg.matrix_norm(u.transpose(1, 2) @ w @ v).pow(2).mean()
    assert math.sqrt(float(mean_sq)) == pytest.approx(expected, rel=0.05)


# --- suggest-rank ---------------------------------------------------------------------------------------
def _known_spectrum_adapter(tmp_path, sigmas=(4.0, 2.0, 1.0, 0.5)):
    """An adapter directory whose single ΔW has exactly these singular values."""
    r = len(sigmas)
    model = _linear_model(24, 20)
    u, v = _orthonormal(24, r, 2), _orthonormal(20, r, 3)
    _lora_with(model, (u * torch.tensor(sigmas, dtype=torch.float64)).float(), v.t().float(), alpha=r)  # s = 1
    lorakit.save_adapter(model, tmp_path / "known")
    return model, tmp_path / "known"


@pytest.mark.parametrize("share,rank", [(0.5, 1), (0.75, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_suggest_rank_is_the_smallest_rank_reaching_the_share(tmp_path, share, rank):
    # energies 16, 4, 1, 0.25 of 21.25: cumulative shares 0.753, 0.941, 0.988, 1
    _, directory = _known_spectrum_adapter(tmp_path)
    result = lorakit.analyze(directory, suggest_rank=share)
    assert result.rank_pattern == {"0": rank}
    assert result.layers[0].suggested_rank == rank


def test_suggested_rank_pattern_is_what_lorakit_train_accepts(tmp_path):
    from lorakit.train.fields import build_options, read_config_file
    from lorakit.train.adapter_options import build_adapter_config
    from lorakit.train.options import TrainOptions

    _, directory = _known_spectrum_adapter(tmp_path)
    result = lorakit.analyze(directory, suggest_rank=0.9, out=tmp_path / "out", plots=False)
    pattern = json.loads((tmp_path / "out" / "rank_pattern.json").read_text())
    assert pattern == {"0": 2}
    assert lorakit.LoraConfig(r=8, target_modules=["0"], rank_pattern=pattern).rank_for("0") == 2
    options = build_options(TrainOptions, read_config_file(result.files["train_config"]))
    config = build_adapter_config(options, "causal")
    assert config.rank_for("0") == 2
    fresh = _linear_model(24, 20)
    lorakit.add_adapter(fresh, config)
    assert fresh[0].deltas["default"].r == 2


# --- truncate -------------------------------------------------------------------------------------------
def test_truncate_k_at_least_r_is_lossless_and_loads(tmp_path):
    model, directory = _known_spectrum_adapter(tmp_path)
    x = torch.randn(5, 20)
    expected = model(x)
    for k in (4, 9):
        result = lorakit.analyze(directory, truncate=k, truncate_out=tmp_path / f"t{k}")
        info = result.layers[0].truncation
        assert info["k"] == 4 and info["expected_error"] == 0.0
        assert info["measured_error"] < 1e-6
        plain = _linear_model(24, 20)
        with torch.no_grad():
            plain[0].weight.copy_(model[0].base_layer.weight)
        lorakit.load_adapter(plain, tmp_path / f"t{k}")
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_truncate_below_r_gives_the_eckart_young_error(tmp_path):
    model, directory = _known_spectrum_adapter(tmp_path)
    result = lorakit.analyze(directory, truncate=2, out=tmp_path / "out", plots=False)
    info = result.layers[0].truncation
    ey = math.sqrt((1.0 + 0.25) / 21.25)  # dropped σ² share: (1² + 0.5²) / (16 + 4 + 1 + 0.25)
    assert info["k"] == 2
    assert info["expected_error"] == pytest.approx(ey, rel=1e-6)  # σ from fp32 factors
    assert info["measured_error"] == pytest.approx(ey, rel=1e-5)
    assert info["params_after"] == 2 * (24 + 20) and info["params_before"] == 4 * (24 + 20)
    # measured independently: materialise both ΔW through the Delta protocol
    truncated = _linear_model(24, 20)
    lorakit.load_adapter(truncated, result.truncated)
    assert lorakit.read_config(result.truncated).r == 2
    before, after = _dense_canonical(model[0]), _dense_canonical(truncated[0])
    error = float(torch.linalg.matrix_norm(before - after) / torch.linalg.matrix_norm(before))
    assert error == pytest.approx(ey, rel=1e-5)


def test_relative_distance_from_spectra_equals_the_dense_distance():
    g = torch.Generator().manual_seed(4)
    x = spectrum_from_factors(torch.randn(10, 3, generator=g), torch.randn(3, 7, generator=g), 0.5)
    y = spectrum_dense(torch.randn(10, 7, generator=g, dtype=torch.float64))
    dx, dy = x.u @ torch.diag(x.s) @ x.v.t(), y.u @ torch.diag(y.s) @ y.v.t()
    expected = float(torch.linalg.matrix_norm(dx - dy) / torch.linalg.matrix_norm(dx))
    assert relative_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_truncating_a_dense_variant_writes_a_lora_adapter(tmp_path):
    """LoHa has no low-rank factors: its dense ΔW is truncated into a plain LoRA file of rank k."""
    case = next(c for c in LAYER_CASES if c.kind == "conv2d")
    model = case.build()
    lorakit.add_adapter(model, lorakit.LoHaConfig(r=2, alpha=2, target_modules=case.targets, init_weights=False))
    result = lorakit.analyze(model, truncate=3, truncate_out=tmp_path / "t")
    config = lorakit.read_config(tmp_path / "t")
    assert config.peft_type == "LORA" and config.r == 3
    plain = case.build()
    lorakit.load_adapter(plain, tmp_path / "t")
    layers = dict(lorakit.adapted_layers(model))
    for path, layer in lorakit.adapted_layers(plain):
        la = result[path]
        dense, approx = _dense_canonical(layers[path]), _dense_canonical(layer)
        error = float(torch.linalg.matrix_norm(dense - approx) / torch.linalg.matrix_norm(dense))
        assert error == pytest.approx(la.spectrum.truncation_error(la.truncation["k"]), rel=1e-4, abs=1e-6)
        assert la.truncation["measured_error"] == pytest.approx(error, rel=1e-4, abs=1e-6)
