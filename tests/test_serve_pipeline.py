"""The server's decode step and pipelined engine, on a tiny Llama from a config: a model whose decode step cannot be
captured as a CUDA graph still serves (eagerly) when the graphs are captured at start; rows freed by a stop token or
at the cache's end serve the next request; the grouped decode attention equals transformers' sdpa path (repeated
key/value heads), value heads of another width included; an engine on a second GPU hands out the tokens its steps
sampled; a failing row sink does not end the engine thread, and a stopped engine refuses adapter calls at
once."""

import pytest
import torch

from lorakit.serve.adapters import AdapterTable
from lorakit.serve.attention import slot_attention
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


def _greedy(model, ids: list, n: int) -> list:
    """n greedy tokens after ids, the model run on the whole sequence each time."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_rows_freed_by_a_stop_or_the_cache_end_serve_the_next_request(tiny_llama):
    """Two cache rows, four requests: a row whose stop token is still being read runs one more step, and the
    request admitted into it afterwards (with the stale step's token in Steps.tokens) still gets the tokens of
    the model run alone; a row that reaches the cache's last column ends with "length" after its last token."""
    import queue

    from lorakit.serve.engine import Engine, Request

    table = AdapterTable(tiny_llama, max_loras=1, max_rank=4)
    steps = Steps(tiny_llama, cache_for(tiny_llama, 2, 13), table, pad_id=0, graphs=False)  # columns 0..11, sink 12
    prompts = {"stops": [5, 6, 7], "long": [9, 8, 7, 6, 5, 4, 3, 2], "next": [3, 1, 4], "last": [2, 7]}
    stop = _greedy(tiny_llama, prompts["stops"], 2)[1]
    limits = {"stops": 9, "long": 30, "next": 6, "last": 30}
    inbox: "queue.Queue" = queue.Queue()
    engine = Engine(steps, table, slots=2)
    engine.start()
    try:
        for name, prompt in prompts.items():
            engine.submit(Request(prompt=prompt, adapter_slot=table.none_slot, max_tokens=limits[name],
                                  stop_ids=frozenset([stop]) if name == "stops" else frozenset(),
                                  emit=lambda kind, value, name=name: inbox.put((name, kind, value))))
        got, ends = {name: [] for name in prompts}, {}
        while len(ends) < len(prompts):
            name, kind, value = inbox.get(timeout=60)
            if kind == "token":
                got[name].append(value)
            else:
                ends[name] = (kind, value)
    finally:
        engine.stop()
    cut = _greedy(tiny_llama, prompts["stops"], 9).index(stop)
    assert ends["stops"] == ("done", "stop") and got["stops"] == _greedy(tiny_llama, prompts["stops"], cut)
    assert ends["next"] == ("done", "length") and got["next"] == _greedy(tiny_llama, prompts["next"], 6)
    for name in ("long", "last"):  # every column up to the sink written: 12 - len(prompt) decode steps + prefill
        n = 12 - len(prompts[name]) + 1
        assert ends[name] == ("done", "length") and got[name] == _greedy(tiny_llama, prompts[name], n)


@pytest.mark.parametrize("value_dim", [8, 6], ids=["same", "narrower-values"])
def test_grouped_decode_attention_equals_repeated_heads(value_dim):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g)  # [B, Hq, 1, D]: 6 query heads over 2 key/value heads
    k, v = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, value_dim, generator=g)
    mask = torch.zeros(3, 1, 1, 5).masked_fill_(torch.arange(5) > torch.tensor([4, 1, 2])[:, None, None, None],
                                               torch.finfo(torch.float32).min)  # rows attend 5, 2, 3 columns
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = slot_attention(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (3, 1, 6, value_dim)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_engine_on_the_second_gpu_hands_out_each_step_s_tokens(tiny_llama, tmp_path):
    """The engine's thread starts on GPU 0: its copies' events, graphs and kernels must follow the model's GPU,
    or the host reads a step's tokens before their copy (and Triton launches on the wrong GPU)."""
    import queue

    import lorakit
    from lorakit.serve.engine import Engine, Request
    from support import randomise_adapters, small_lora

    model = tiny_llama.to("cuda:1")
    lorakit.add_adapter(model, small_lora(target_modules=["q_proj", "v_proj"]), "x")
    randomise_adapters(model, seed=0)
    saved = lorakit.save_adapter(model, tmp_path / "x", "x")
    lorakit.delete_adapter(model, "x")
    table = AdapterTable(model, max_loras=1, max_rank=4)
    table.load("x", str(saved))
    steps = Steps(model, cache_for(model, 4, 40), table, pad_id=0, graphs=True)
    steps.capture_all()
    engine = Engine(steps, table, slots=4)
    engine.start()
    inbox: "queue.Queue" = queue.Queue()
    runs = [([5, 6, 7], "x"), ([9, 8, 7, 6, 5], None), ([3, 1], "x")]
    try:
        for i, (prompt, adapter) in enumerate(runs):
            engine.submit(Request(prompt=prompt, adapter_slot=engine.reserve(adapter), max_tokens=20,
                                  emit=lambda kind, value, i=i: inbox.put((i, kind, value))))
        got = [[] for _ in runs]
        for _ in runs:
            while True:
                i, kind, value = inbox.get(timeout=120)
                if kind != "token":
                    assert (kind, value) == ("done", "length")
                    break
                got[i].append(value)
    finally:
        engine.stop()
        table.close()  # the reference below: the model with set_active, not the table's routing
    for (prompt, adapter), tokens in zip(runs, got):
        ids = list(prompt)
        for token in tokens:
            with torch.no_grad():
                if adapter is None:
                    with lorakit.disabled(model):
                        logits = model(torch.tensor([ids], device="cuda:1")).logits[0, -1]
                else:
                    lorakit.set_active(model, adapter)
                    logits = model(torch.tensor([ids], device="cuda:1")).logits[0, -1]
            assert logits[token] >= logits.max() - 1e-3  # the argmax (up to a tie)
            ids.append(token)


def test_a_failing_sink_does_not_end_the_engine_and_a_stopped_engine_answers_at_once(tiny_llama, monkeypatch):
    """A step that fails while a row's sink also raises: the engine thread lives on and serves the next request;
    after stop, an adapter call is refused at once (not after its timeout) and a waiting call gets the refusal."""
    import queue
    import time

    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import SHUTTING_DOWN, Engine, Request

    table = AdapterTable(tiny_llama, max_loras=1, max_rank=4)
    steps = Steps(tiny_llama, cache_for(tiny_llama, 2, 16), table, pad_id=0, graphs=False)
    engine = Engine(steps, table, slots=2)
    real_sample, broken = engine_module.sample_on_device, [True]

    def sample_once_broken(*args, **kwargs):  # the first decode step fails after its prefill
        if broken[0] and args[2:] and args[2] is not None:
            broken[0] = False
            raise RuntimeError("a failing step")
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(engine_module, "sample_on_device", sample_once_broken)

    def raising_sink(kind, value):
        if kind == "error":
            raise ValueError("the client's queue is gone")
    inbox: "queue.Queue" = queue.Queue()
    engine.start()
    try:
        engine.submit(Request(prompt=[5, 6, 7], adapter_slot=table.none_slot, max_tokens=4, emit=raising_sink))
        deadline = time.monotonic() + 30
        while broken[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(Request(prompt=[5, 6, 7], adapter_slot=table.none_slot, max_tokens=2,
                              emit=lambda kind, value: inbox.put((kind, value))))
        events = [inbox.get(timeout=30) for _ in range(3)]
        assert [k for k, _ in events] == ["token", "token", "done"]
        assert engine._thread.is_alive()
    finally:
        engine.stop()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=SHUTTING_DOWN):
        engine.call(lambda: None, timeout=30)
    assert time.monotonic() - started < 5
