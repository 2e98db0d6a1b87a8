"""One LoRA training step, lorakit vs PEFT, on the SmolLM2-135M shape (random weights from config), on the GPU.

    python benchmarks/step_vs_peft.py          # prints ms per step, lorakit and PEFT alternated twice

fp32 weights under bf16 autocast, batch 8 x 64 tokens, LoRA r=8 on q_proj,v_proj, AdamW, the loss of
lorakit.train.loop (the same call for both): a launch-bound case where per-layer Python overhead shows.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lorakit  # noqa: E402
from lorakit.train.estimate import load_config  # noqa: E402
from lorakit.train.loop import causal_loss_sum  # noqa: E402


def build(kind: str, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda()
    if kind == "lorakit":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return model


def ms_per_step(kind: str, config, batch: dict, steps: int = 100, warmup: int = 10) -> float:
    model = build(kind, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = causal_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    config, _ = load_config("smollm2-135m")
    config._attn_implementation = "sdpa"
    x = torch.randint(0, config.vocab_size, (8, 64), device="cuda")
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    for kind in ["lorakit", "peft", "lorakit", "peft"]:
        print(f"{kind}: {ms_per_step(kind, config, batch):.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
