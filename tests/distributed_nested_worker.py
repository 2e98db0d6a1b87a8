"""torchrun worker (gloo, CPU) for test_distributed_fast: FSDP2 units nested inside checkpointed blocks (a
transformers GradientCheckpointingLayer holding modules that HF's `_no_split_modules` names, as in SmolVLM's vision
layers), with optimize(checkpoint=True). Writes rank 0's loss and gradients (gathered from the shards)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("LORAKIT_TRITON", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402

import lorakit  # noqa: E402
from lorakit.core.blocks import repeated_blocks  # noqa: E402


class Inner(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Layer(GradientCheckpointingLayer):
    def __init__(self, d: int):
        super().__init__()
        self.a, self.b = Inner(d), Inner(d)

    def forward(self, hidden_states):
        return hidden_states + self.b(self.a(hidden_states))


class Net(nn.Module):
    _no_split_modules = ["Inner"]  # FSDP's units sit inside the checkpointed layers

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


def build() -> Net:
    torch.manual_seed(0)
    net = Net()
    lorakit.add_adapter(net, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights=False))
    return net.train()


def inputs() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    net = build()
    checkpointed = lorakit.optimize(net, checkpoint=True)["checkpoint"]
    for unit in repeated_blocks(net, no_split_classes=True):  # as train/distributed.py shards
        fully_shard(unit)
    fully_shard(net)
    loss = net(inputs()).square().mean()
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in net.named_parameters() if p.grad is not None}
    if dist.get_rank() == 0:
        torch.save(dict(loss=loss.detach(), grads=grads, checkpointed=checkpointed), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
