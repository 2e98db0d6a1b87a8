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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_engine_on_the_second_gpu_hands_out_each_step_s_tokens(tiny_llama):
    """The engine's thread starts on GPU 0: its copies' events, graphs and kernels must follow the model's GPU,
    or the host reads a step's tokens before their copy (and Triton launches on the wrong GPU)."""
    import queue

    from lorakit.serve.engine import Engine, Request

    model = tiny_llama.to("cuda:1")
    table = AdapterTable(model, max_loras=1, max_rank=4)
    steps = Steps(model, cache_for(model, 4, 40), table, pad_id=0, graphs=True)
    steps.capture_all()
    engine = Engine(steps, table, slots=4)
    engine.start()
    inbox: "queue.Queue" = queue.Queue()
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [3, 1]]
    try:
        for i, prompt in enumerate(prompts):
            engine.submit(Request(prompt=prompt, adapter_slot=table.none_slot, max_tokens=20,
                                  emit=lambda kind, value, i=i: inbox.put((i, kind, value))))
        got = [[] for _ in prompts]
        for _ in range(len(prompts)):
            while True:
                i, kind, value = inbox.get(timeout=120)
                if kind != "token":
                    assert (kind, value) == ("done", "length")
                    break
                got[i].append(value)
    finally:
        engine.stop()
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        for token in tokens:
            with torch.no_grad():
                logits = model(torch.tensor([ids], device="cuda:1")).logits[0, -1]
            assert logits[token] >= logits.max() - 1e-3  # the argmax (up to a tie)
            ids.append(token)
