"""lorakit analyze end to end: trained adapters, HF base directories, the command line, plots, bad input."""

import hashlib
import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli import app as cli
from lorakit.cli.analyze import AnalyzeOptions, run_analyze
from support import one_thread  # noqa: F401


# --- adapters trained in the test --------------------------------------------------------------------------
def _teacher(seed=0):
    """W [16, 16] and a rank-1 change u·vᵀ the adapters have to learn: y = (W + u·vᵀ)·x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 16, generator=g) / 4
    u, v = torch.randn(16, 1, generator=g), torch.randn(1, 16, generator=g)
    return w, u @ v


def _train(r: int, seed: int, directory, steps: int = 100):
    w, change = _teacher()
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x @ (w + change).t())
        loss.backward()
        opt.step()
        opt.zero_grad()
    lorakit.save_adapter(model, directory)
    return model, change


def test_trained_adapters_of_rank_2_and_8_find_the_same_rank_1_change(tmp_path):
    _, change = _train(2, seed=1, directory=tmp_path / "r2")
    model8, _ = _train(8, seed=2, directory=tmp_path / "r8")
    result = lorakit.analyze(tmp_path / "r2", compare=tmp_path / "r8", suggest_rank=0.95)
    la, other = result.layers[0], result.compare.layers[0]
    assert la.spectrum.energy_rank(0.95) == 1 and other.spectrum.energy_rank(0.95) == 1
    assert result.rank_pattern == {"0": 1}
    assert la.spectrum.s[0] == pytest.approx(float(torch.linalg.svdvals(change)[0]), rel=0.05)
    # both found u·vᵀ: their top directions coincide, on ΔW's input and output sides
    assert float(la.phi["delta_in"][0, 0]) > 0.95 and float(la.phi["delta_out"][0, 0]) > 0.95
    # with the base, cross-checked against the dense route: ‖U_kᵀ W V_k‖ from torch.linalg.svd of s·B·A (fp64)
    layer = model8[0]
    base = lorakit.analyze(model8).layers[0].base
    delta = layer.deltas["default"]
    u, s, vh = torch.linalg.svd(delta.scaling * delta.lora_B.detach().double() @ delta.lora_A.detach().double())
    k = base["k"]
    w = layer.base_layer.weight.detach().double()
    assert k == int((s > s[0] * 16 * torch.finfo(torch.float32).eps).sum())
    assert base["proj_delta"] == pytest.approx(float(torch.linalg.matrix_norm(u[:, :k].t() @ w @ vh[:k].t())), rel=1e-6)
    assert base["amplification"] == pytest.approx(float(s.pow(2).sum().sqrt()) / base["proj_delta"], rel=1e-6)


# --- Hugging Face base directories -------------------------------------------------------------------------
def _tiny_bert(num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def bert_dirs(tmp_path):
    """A tiny 3-class BERT saved as an HF directory, and two SEQ_CLS adapters on it (r=2 and r=6)."""
    base = _tiny_bert(3)
    base.save_pretrained(tmp_path / "base")
    models = {}
    for r in (2, 6):
        model = _tiny_bert(3)
        torch.manual_seed(r)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"],
                                                      task_type="SEQ_CLS", init_lora_weights=False))
        lorakit.save_adapter(model, tmp_path / f"r{r}")
        models[r] = model
    return tmp_path, models


def test_base_directory_gives_the_figures_of_the_attached_model(bert_dirs):
    tmp_path, models = bert_dirs
    from_dir = lorakit.analyze(tmp_path / "r2", base=tmp_path / "base")  # num_labels=3 read from the head
    from_model = lorakit.analyze(models[2])
    assert from_dir.base == str(tmp_path / "base")
    assert [la.path for la in from_dir.layers] == [la.path for la in from_model.layers]
    assert len(from_dir.layers) == 4  # 2 layers x query, value
    for x, y in zip(from_dir.layers, from_model.layers):
        assert x.base["amplification"] == pytest.approx(y.base["amplification"], rel=1e-5)
        assert x.base["proj_w_top"] == pytest.approx(y.base["proj_w_top"], rel=1e-5)


def test_base_model_object_gets_its_adapters_back_off(bert_dirs):
    tmp_path, _ = bert_dirs
    base = _tiny_bert(3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = lorakit.analyze(tmp_path / "r2", base=base, compare=tmp_path / "r6")
    assert result.layers[0].base is not None and result.compare.layers[0].base is not None
    assert lorakit.list_adapters(base) == [] and not list(lorakit.adapted_layers(base))
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_plots_and_files(bert_dirs):
    tmp_path, _ = bert_dirs
    out = tmp_path / "analysis"
    result = lorakit.analyze(tmp_path / "r2", base=tmp_path / "base", compare=tmp_path / "r6", out=out,
                             suggest_rank=0.9, truncate=1)
    for key in ("spectrum_png", "energy_png", "phi_png", "phi_depth_png", "amplification_png"):
        data = open(result.files[key], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, key
    assert result.files["phi_png"].endswith("phi_1.png")  # the middle of blocks 0 and 1
    saved = json.loads((out / "analysis.json").read_text())
    first = saved["adapter"]["layers"][0]
    assert first["rank"] == 2 and len(first["phi"]["A"]["matrix"]) == 2 and len(first["phi"]["A"]["matrix"][0]) == 6
    assert first["base"]["amplification"] == pytest.approx(result.layers[0].base["amplification"])
    assert saved["compare"]["layers"][0]["nominal_rank"] == 6
    assert (out / "table.txt").read_text().startswith("adapter: r2")
    assert lorakit.read_config(out / "truncated-r1").r == 1


# --- the command line --------------------------------------------------------------------------------------
@pytest.fixture
def analyze_command(monkeypatch):
    """`lorakit analyze` as the lead registers it (registered here too, so the test does not depend on it)."""
    monkeypatch.setitem(cli.COMMANDS, "analyze", cli.Command(AnalyzeOptions, run_analyze, "Analyse an adapter."))


def test_command_line(bert_dirs, analyze_command, capsys):
    tmp_path, _ = bert_dirs
    out = tmp_path / "cli"
    code = cli.main(["analyze", str(tmp_path / "r6"), "--compare", str(tmp_path / "r2"), "--out", str(out),
                     "--suggest-rank", "0.8", "--truncate", "3", "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "adapter: r6" in printed and "compared with: r2" in printed and "sugg.r" in printed
    assert (out / "analysis.json").is_file() and (out / "rank_pattern.json").is_file()
    assert not list(out.glob("*.png"))
    assert lorakit.read_config(out / "truncated-r3").r == 3


@pytest.mark.parametrize("args,message", [
    (["does-not-exist"], "no adapter directory"),
    (["{r2}", "--suggest-rank", "1.5"], "in (0, 1]"),
    (["{r2}", "--truncate", "0"], "k >= 1"),
    (["{r2}", "--truncate", "2", "--truncate-out", "{r2}"], "overwrite"),
    ([], "needs an adapter directory"),
])
def test_command_line_bad_input(bert_dirs, analyze_command, capsys, args, message):
    tmp_path, _ = bert_dirs
    digest = hashlib.sha256((tmp_path / "r2" / "adapter_model.safetensors").read_bytes()).hexdigest()
    args = [a.format(r2=tmp_path / "r2") for a in args]
    code = cli.main(["analyze", *args, "--out", str(tmp_path / "o"), "--no-plots"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert hashlib.sha256((tmp_path / "r2" / "adapter_model.safetensors").read_bytes()).hexdigest() == digest


def test_api_bad_input(tmp_path):
    a = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lorakit.add_adapter(a, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    lorakit.save_adapter(a, tmp_path / "a")
    b = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lorakit.add_adapter(b, lorakit.LoraConfig(r=2, target_modules=["1"], init_lora_weights=False))
    lorakit.save_adapter(b, tmp_path / "b")
    with pytest.raises(lorakit.ConfigError, match="none of"):
        lorakit.analyze(tmp_path / "a", compare=tmp_path / "b")
    with pytest.raises(lorakit.ConfigError, match="base="):
        lorakit.analyze(a, base=tmp_path)
    with pytest.raises(lorakit.ConfigError, match="needs a directory"):
        lorakit.analyze(tmp_path / "a", truncate=1)
    lorakit.merge(a)
    with pytest.raises(lorakit.ConfigError, match="merged"):
        lorakit.analyze(a)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{}")
    with pytest.raises(lorakit.LorakitError):
        lorakit.analyze(tmp_path / "broken")
