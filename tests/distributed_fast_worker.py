"""One rank of tests/test_distributed_fast.py, started by torchrun (gloo, CPU): a tiny Llama with an adapter and
lorakit.optimize() (with checkpoint=True in one case), wrapped in DDP or FSDP2 (fully_shard per decoder layer, then
the root), one forward/backward on this rank's rows, for every (strategy, case) in one launch. Rank 0 writes, per case, the mean loss, the
full adapter gradients and the number of fused calls.
Usage: distributed_fast_worker.py OUT.pt"""

import sys

import torch
import torch.distributed as dist

import lorakit
import lorakit.fast.lora_linear as ll

CASES = {"lora": {}, "dora": {"use_dora": True}, "lora-checkpoint": {}}  # name: adapter options
OPTIMIZE = {"lora-checkpoint": {"checkpoint": True}}  # name: optimize() options, where not the defaults
STRATEGIES = ("ddp", "fsdp")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(adapter: dict):
    """The model every rank and the one-process reference start from (same seeds)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **adapter))
    return model.train()


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


def adapter_grads(model) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def run_case(strategy: str, name: str, rank: int, world: int) -> dict:
    model = build(CASES[name])
    calls = []
    real = ll.FusedLoraLinears.apply
    ll.FusedLoraLinears.apply = lambda *a: calls.append(1) or real(*a)
    try:
        lorakit.optimize(model, **OPTIMIZE.get(name, {}))
        if strategy == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        ids = batch().chunk(world)[rank]  # this rank's rows; equal token counts: the mean of means is the mean
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        ll.FusedLoraLinears.apply = real
    grads = adapter_grads(model)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return {"loss": mean / world, "grads": grads, "calls": len(calls)}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"{s}-{name}": run_case(s, name, rank, world) for s in STRATEGIES for name in CASES}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
