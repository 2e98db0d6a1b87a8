"""The engine's pipelined steps and the decode graphs, on a tiny Llama from a config: a model whose decode step
cannot be captured as a CUDA graph still serves (eagerly) when the graphs are captured at start."""

import pytest
import torch

from lorakit.serve.adapters import AdapterTable
from lorakit.serve.cache import Steps, cache_for


def test_a_capture_that_fails_at_start_decodes_eagerly(tiny_llama, monkeypatch, capsys):
    table = AdapterTable(tiny_llama, max_loras=1, max_rank=4)
    steps = Steps(tiny_llama, cache_for(tiny_llama, 2, 16), table, pad_id=0, graphs=False)
    steps.graphs = True  # as on CUDA; the capture itself is what fails

    def cannot_capture(rows, kv_len):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(steps, "_capture", cannot_capture)
    assert steps.capture_all() == 0
    assert not steps.graphs and "decoding without graphs" in capsys.readouterr().err
    steps.prefill([[5, 6, 7]], [0], [table.none_slot])
    with torch.no_grad():
        want = tiny_llama(torch.tensor([[5, 6, 7, 9]])).logits[0, -1]
    torch.testing.assert_close(steps.decode([9], [3], [table.none_slot])[0], want, atol=1e-4, rtol=1e-4)
