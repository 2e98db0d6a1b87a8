"""The server's batch machinery in process, on a tiny Llama from a config: the slot KV cache with per-row
positions and per-row adapter slots gives each row the logits of the model run on that row alone with its
adapter; rows join between steps; adapters load into free slots in place and leave when their last row ends;
the engine thread finishes, cancels and seeds rows independently."""

import queue
import threading

import pytest
import torch

import lorakit
from lorakit.errors import ServeError
from lorakit.multi import kernels
from lorakit.serve import attention
from lorakit.serve.adapters import AdapterTable
from lorakit.serve.cache import Steps, cache_for
from lorakit.serve.engine import Engine, Request
from support import one_thread, randomise_adapters, small_lora  # noqa: F401  (fixture)

MAX_LEN = 48


def serve_setup(model, tmp_path):
    """(table, adapter dirs): adapters x (q, v; rank 4) and y (k, o, up; rank 8) loaded, z and w saved only
    (3 slots)."""
    dirs = {}
    specs = [("x", ["q_proj", "v_proj"], 4), ("y", ["k_proj", "o_proj", "up_proj"], 8), ("z", ["q_proj", "up_proj"], 2),
             ("w", ["gate_proj"], 4)]  # z adapts only layers x and y adapt; w a layer none of them does
    for seed, (name, targets, r) in enumerate(specs):
        lorakit.add_adapter(model, small_lora(r=r, target_modules=targets), name)
        randomise_adapters(model, seed=seed)  # the only adapter on the model: each is deleted once saved
        dirs[name] = lorakit.save_adapter(model, tmp_path / name, name)
        lorakit.delete_adapter(model, name)
    table = AdapterTable(model, max_loras=3, max_rank=8)
    table.load("x", str(dirs["x"]))
    table.load("y", str(dirs["y"]))
    return table, dirs


@pytest.fixture
def served(tiny_llama, tmp_path):
    """(model, table, steps, adapter dirs): see serve_setup."""
    table, dirs = serve_setup(tiny_llama, tmp_path)
    steps = Steps(tiny_llama, cache_for(tiny_llama, 4, MAX_LEN), table, pad_id=0, graphs=False)
    yield tiny_llama, table, steps, dirs
    table.close()


def reference(model, dirs, adapter, ids) -> torch.Tensor:
    """Last-token logits of the model with `adapter` alone (None: the base), on the whole sequence."""
    table_routing = [layer.routing for _, layer in lorakit.adapted_layers(model)]
    for _, layer in lorakit.adapted_layers(model):
        layer.routing = None  # the table's router off: the reference forward with set_active
    try:
        with torch.no_grad():
            if adapter is None:
                with lorakit.disabled(model):
                    return model(torch.tensor([ids], device=model.device)).logits[0, -1]
            lorakit.set_active(model, adapter)
            return model(torch.tensor([ids], device=model.device)).logits[0, -1]
    finally:
        for (_, layer), routing in zip(lorakit.adapted_layers(model), table_routing):
            layer.routing = routing


@pytest.mark.parametrize("grouped", [False, True], ids=["sdpa", "grouped-decode"])
def test_rows_of_different_lengths_and_adapters_share_steps(served, grouped, monkeypatch):
    model, table, steps, dirs = served
    grouped_calls = []
    if grouped:  # the server's attention: decode queries grouped per key/value head (4 query heads, 2 kv heads)
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, *args, **kwargs):
            grouped_calls.append(q.shape[1] == k.shape[1] == 2 and q.shape[2] == 2)  # [B, Hkv, g, D]
            return real(q, k, *args, **kwargs)

        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
        attention.install(model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 9, 3)]
    adapters = ["y", None, "x"]
    slots = [table.slot_of(a) if a else table.none_slot for a in adapters]
    rows = [2, 0, 1]  # cache slots need not follow the batch order
    logits = steps.prefill(seqs, rows, slots)
    for i in range(3):
        torch.testing.assert_close(logits[i], reference(model, dirs, adapters[i], seqs[i]), atol=1e-4, rtol=1e-4)
    late = torch.randint(1, 128, (7,), generator=g).tolist()
    for step in range(4):
        if step == 2:  # a row joins between two decode steps, into the free slot 3, with adapter x
            torch.testing.assert_close(steps.prefill([late], [3], [table.slot_of("x")])[0],
                                       reference(model, dirs, "x", late), atol=1e-4, rtol=1e-4)
        by_row = {r: (s, a, sl) for r, s, a, sl in zip(rows, seqs, adapters, slots)}
        if step >= 2:
            by_row[3] = (late, "x", table.slot_of("x"))
        nxt = {r: int(torch.randint(1, 128, (1,), generator=g)) for r in by_row}
        n = max(by_row) + 1
        out = steps.decode([nxt[r] for r in range(n)], [len(by_row[r][0]) for r in range(n)],
                           [by_row[r][2] for r in range(n)])
        for r, (seq, adapter, _) in by_row.items():
            seq.append(nxt[r])
            torch.testing.assert_close(out[r], reference(model, dirs, adapter, seq), atol=1e-4, rtol=1e-4)
    assert sum(grouped_calls) == (4 * 2 if grouped else 0)  # every decode step, every layer


def test_prefill_and_decode_kernels_give_each_row_its_adapter(kernel_device, tiny_llama, tmp_path, monkeypatch):
    """The server's Triton path: SGMV over a mixed prefill (left-padded rows, a base row between adapter rows,
    neighbouring rows of one adapter), then BGMV for one decode step; each row as the model with its adapter alone."""
    model = tiny_llama.to(kernel_device)
    table, dirs = serve_setup(model, tmp_path)
    calls = []
    for name in ("sgmv", "bgmv"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    try:
        steps = Steps(model, cache_for(model, 4, MAX_LEN), table, pad_id=0, graphs=False)
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (6, 3, 9, 9)]
        adapters = ["y", None, "x", "x"]
        slots = [table.slot_of(a) if a else table.none_slot for a in adapters]
        logits = steps.prefill(seqs, [0, 1, 2, 3], slots)
        assert "sgmv" in calls and "bgmv" not in calls
        for i, adapter in enumerate(adapters):
            torch.testing.assert_close(logits[i], reference(model, dirs, adapter, seqs[i]), atol=1e-4, rtol=1e-4)
        nxt = [5, 6, 7, 8]
        out = steps.decode(nxt, [len(s) for s in seqs], slots)
        assert "bgmv" in calls
        for i, adapter in enumerate(adapters):
            torch.testing.assert_close(out[i], reference(model, dirs, adapter, seqs[i] + [nxt[i]]), atol=1e-4,
                                       rtol=1e-4)
    finally:
        table.close()


@pytest.mark.parametrize("limit", [1, 5, 8, 9, 64, 265, 2049])
def test_graphs_captured_up_front_cover_every_step_size(limit):
    from lorakit.serve.cache import _bucket, _buckets

    assert _buckets(limit) == sorted({_bucket(n, limit) for n in range(1, limit + 1)})


def test_idle_rows_below_the_last_running_row_change_nothing(served):
    model, table, steps, dirs = served
    seq = [3, 4, 5, 6]
    steps.prefill([seq], [2], [table.slot_of("y")])
    out = steps.decode([0, 0, 7], [-1, -1, 4], [table.none_slot, table.none_slot, table.slot_of("y")])
    torch.testing.assert_close(out[2], reference(model, dirs, "y", seq + [7]), atol=1e-4, rtol=1e-4)


def test_loading_into_a_free_slot_writes_in_place(served):
    model, table, steps, dirs = served
    generation = table.generation
    stacks = {k: (s.a.data_ptr(), s.bt.data_ptr()) for k, s in table.stacks.items()}
    table.load("z", str(dirs["z"]))  # rank 2 on layers x and y already adapt: no reallocation
    assert table.generation == generation
    assert {k: (s.a.data_ptr(), s.bt.data_ptr()) for k, s in table.stacks.items()} == stacks
    seq = [9, 8, 7, 6, 5]
    torch.testing.assert_close(steps.prefill([seq], [0], [table.slot_of("z")])[0], reference(model, dirs, "z", seq),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ServeError, match="max-loras"):
        table.load("w", str(dirs["w"]))
    with pytest.raises(ServeError, match="already loaded"):
        table.load("z", str(dirs["z"]))


def test_unload_waits_for_the_last_row_and_new_layers_reallocate(served):
    model, table, steps, dirs = served
    slot = table.slot_of("x")
    table.acquire(slot)  # a row still runs with x
    table.unload("x")
    assert table.slot_of("x") is None and "x" in lorakit.list_adapters(model)  # weights stay for that row
    seq = [1, 2, 3]
    torch.testing.assert_close(steps.prefill([seq], [1], [slot])[0], reference(model, dirs, "x", seq),
                               atol=1e-4, rtol=1e-4)
    table.release(slot)
    assert "x" not in lorakit.list_adapters(model) and table.stacks[next(iter(table.stacks))].a[slot].abs().sum() == 0
    generation = table.generation
    table.load("w", str(dirs["w"]))  # gate_proj: a layer no loaded adapter adapts → the stacks are rebuilt
    assert table.generation == generation + 1
    seq = [4, 5, 6, 7]
    for name in ("w", "y"):
        torch.testing.assert_close(steps.prefill([seq], [0], [table.slot_of(name)])[0],
                                   reference(model, dirs, name, seq), atol=1e-4, rtol=1e-4)


def test_a_load_that_fails_mid_rebuild_leaves_the_server_as_it_was(served, monkeypatch):
    model, table, steps, dirs = served
    generation, stacks, before = table.generation, dict(table.stacks), lorakit.list_adapters(model)

    def out_of_memory(*args):
        raise RuntimeError("out of memory")
    monkeypatch.setattr("lorakit.serve.adapters.padded_rank", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        table.load("w", str(dirs["w"]))  # gate_proj: new stacks needed, and their allocation fails
    assert table.slot_of("w") is None and lorakit.list_adapters(model) == before
    assert table.generation == generation and table.stacks == stacks
    seq = [4, 5, 6, 7]
    torch.testing.assert_close(steps.prefill([seq], [0], [table.slot_of("y")])[0], reference(model, dirs, "y", seq),
                               atol=1e-4, rtol=1e-4)  # the routing still runs y's rows


def test_an_adapter_without_a_low_rank_form_is_refused_untouched(served, tmp_path):
    model, table, _, _ = served
    before = lorakit.list_adapters(model)
    lorakit.add_adapter(model, lorakit.LoHaConfig(r=2, target_modules=["q_proj"]), "loha")
    lorakit.save_adapter(model, tmp_path / "loha", "loha")
    lorakit.delete_adapter(model, "loha")
    with pytest.raises(ServeError, match="low-rank linear form"):
        table.load("loha", str(tmp_path / "loha"))
    assert lorakit.list_adapters(model) == before and table.slot_of("loha") is None


# --- the engine thread -----------------------------------------------------------------------------------------
def _run(engine: Engine, requests: list[Request], timeout: float = 60.0) -> list[list]:
    """Submit requests and collect each one's events until its done/error (bounded)."""
    inbox: "queue.Queue" = queue.Queue()
    out: list[list] = [[] for _ in requests]
    for i, req in enumerate(requests):
        req.emit = (lambda i: lambda kind, value: inbox.put((i, kind, value)))(i)
        engine.submit(req)
    open_ = set(range(len(requests)))
    while open_:
        i, kind, value = inbox.get(timeout=timeout)
        out[i].append((kind, value))
        if kind != "token":
            open_.discard(i)
    return out


def test_engine_rows_end_on_their_own_terms(served):
    model, table, steps, dirs = served
    engine = Engine(steps, table, slots=4)
    engine.start()
    try:
        def req(adapter, **kw):
            slot = engine.reserve(adapter)
            return Request(prompt=[5, 6, 7, 8], adapter_slot=slot, max_tokens=kw.pop("max_tokens", 5),
                           emit=None, **kw)
        greedy = _run(engine, [req("x"), req(None, max_tokens=3), req("y", temperature=1.0, seed=3),
                               req("y", temperature=1.0, seed=3, top_p=0.5)])
        assert [len(e) for e in greedy] == [6, 4, 6, 6] and all(e[-1] == ("done", "length") for e in greedy)
        seq = [5, 6, 7, 8]
        for kind, token in greedy[0][:-1]:  # greedy x: each token the argmax of the reference
            assert token == int(reference(model, dirs, "x", seq).argmax())
            seq.append(token)
        again = _run(engine, [req("y", temperature=1.0, seed=3)])
        assert again[0] == greedy[2]  # the same seed, another batch: the same tokens
        stopper = req("x", max_tokens=5, stop_ids=frozenset([greedy[0][1][1]]))
        assert _run(engine, [stopper])[0] == [greedy[0][0], ("done", "stop")]
        long = req("y", max_tokens=MAX_LEN * 4)
        inbox: "queue.Queue" = queue.Queue()

        def hang_up(kind, value):  # the client goes away at its first token (on the engine thread: no race)
            inbox.put((kind, value))
            long.cancel()
        long.emit = hang_up
        engine.submit(long)
        assert [inbox.get(timeout=60)[0], inbox.get(timeout=60)] == ["token", ("done", "cancelled")]
        assert engine.call(lambda: table.users.get(table.slot_of("y"), 0), timeout=60) == 0
    finally:
        engine.stop()
    assert not any(t.name == "lorakit-serve-engine" for t in threading.enumerate())


@pytest.mark.parametrize("argv, says", [
    (["--adapter", "x=/no/such/dir"], "not an adapter directory"),
    (["--adapter", "a=/tmp", "a=/tmp"], "given twice"),
    (["--adapter", "=/tmp"], "NAME=DIR"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-loras", "0"], "--max-loras"),
])
def test_cli_refuses_bad_options_before_loading_anything(argv, says, capsys, monkeypatch):
    from lorakit.cli.app import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the options were checked")
    monkeypatch.setattr("lorakit.loading.models.load_pretrained", no_model)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit serve: error:") and says in err and len(err.splitlines()) == 1


def test_cli_refuses_a_port_in_use_before_loading_anything(capsys, monkeypatch):
    import socket

    from lorakit.cli.app import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the port was checked")
    monkeypatch.setattr("lorakit.loading.models.load_pretrained", no_model)
    with socket.socket() as taken:  # a listening socket holds the port (SO_REUSEADDR does not share it)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit serve: error:") and f"--port {port}" in err and len(err.splitlines()) == 1


def test_sampling_rows_keep_their_own_settings():
    from lorakit.serve.engine import sample

    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]] * 4)
    reqs = [Request(prompt=[1], adapter_slot=0, max_tokens=1, emit=None, temperature=t, top_p=p)
            for t, p in [(0.0, 1.0), (1.0, 0.3), (1.0, 1.0), (5.0, 0.9)]]
    for r in reqs[2:]:
        r.generator = torch.Generator().manual_seed(0)
    seen = [set() for _ in reqs]
    for _ in range(60):
        for i, token in enumerate(sample(logits, reqs)):
            seen[i].add(token)
    assert seen[0] == {1} and seen[1] == {1}  # greedy; top_p 0.3 keeps only the most likely token
    assert {1, 2} <= seen[2] and seen[3] <= {0, 1, 2} and len(seen[3]) >= 2  # top_p 0.9 at T=5 drops the tail
    again = [torch.Generator().manual_seed(0) for _ in range(2)]
    for r, g in zip(reqs[2:], again):
        r.generator = g
    first = [sample(logits, reqs)[2:] for _ in range(5)]
    for r in reqs[2:]:
        r.generator = torch.Generator().manual_seed(0)
    assert [sample(logits, reqs)[2:] for _ in range(5)] == first  # seeded rows repeat


def test_a_vanishing_temperature_samples_greedily_beside_other_rows():
    from lorakit.serve.engine import sample

    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 4.0, 0.5]])
    tiny = Request(prompt=[1], adapter_slot=0, max_tokens=1, emit=None, temperature=1e-40)  # logits/T overflow
    hot = Request(prompt=[1], adapter_slot=0, max_tokens=1, emit=None, temperature=1.0, top_p=0.5)
    assert sample(logits, [tiny, hot]) == [1, 2]


def test_seeds_torch_cannot_take_are_refused_at_the_request():
    from pydantic import ValidationError

    from lorakit.serve.protocol import CompletionRequest

    assert CompletionRequest(model="m", prompt="x", seed=2**64 - 1).seed == 2**64 - 1
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="x", seed=seed)
