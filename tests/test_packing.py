"""Packed training: rows packed into token-budget micro-batches give each row's own logits, the unpacked loss
and gradients, never attend across rows, split across processes, and resume bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.loading.rows import IGNORE, Example
from lorakit.train import packed_attention as pa
from lorakit.train.batches import collate
from lorakit.train.loop import causal_loss_sum
from lorakit.train.packing import PackedBatches, best_fit_decreasing, collate_packed
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = (7, 12, 4)  # three rows of different lengths, packed into a budget with a padding tail


def _rows(vocab: int, lengths=LENGTHS, prompt: int = 2, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


def _tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)).eval()


def _packed_logits(model, rows, path, budget=32):
    model.__dict__[pa.PATH_ATTR] = path
    batch = collate_packed(rows, pad_id=0, budget=budget)
    with torch.no_grad():
        logits = model(**pa.packed_inputs(model, batch)).logits[0]
    starts = [0]
    for e in rows:
        starts.append(starts[-1] + len(e.input_ids))
    return [logits[a:b] for a, b in zip(starts, starts[1:])], batch


def _alone(model, row):
    with torch.no_grad():
        return model(input_ids=torch.tensor([row.input_ids])).logits[0]


@pytest.mark.parametrize("family,path", [("llama", "positions"), ("llama", "mask"), ("bert", "mask")])
def test_packed_rows_give_each_rows_own_logits(tiny_llama, family, path):
    model = tiny_llama if family == "llama" else _tiny_bert()
    rows = _rows(128)
    per_row, _ = _packed_logits(model, rows, path)
    for got, row in zip(per_row, rows):
        torch.testing.assert_close(got, _alone(model, row), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,path", [("llama", "positions"), ("bert", "mask")])
def test_no_attention_across_rows(tiny_llama, family, path):
    model = tiny_llama if family == "llama" else _tiny_bert()
    rows = _rows(128)
    before, _ = _packed_logits(model, rows, path)
    changed = [rows[0], Example([(t + 1) % 128 for t in rows[1].input_ids], rows[1].labels), rows[2]]
    after, _ = _packed_logits(model, changed, path)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)  # row 1 does not move
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=1e-6)  # nor row 3
    assert not torch.allclose(after[1], before[1])  # row 2 itself did


def test_probe_picks_the_library_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert pa.choose_path(llama) == "positions"  # transformers' position_ids detection is exact for Llama
    bert = _tiny_bert()
    assert not pa.probe_exact(bert, "positions")  # an encoder's mask builder ignores position_ids ...
    assert pa.choose_path(bert) == "mask"  # ... so it gets the explicit block mask


def _adapted(tiny_llama):
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for n, p in tiny_llama.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return tiny_llama


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["plain", "optimize", "checkpointing"])
def test_packed_step_equals_unpacked_step(tiny_llama, variant):
    model = _adapted(tiny_llama)
    rows = _rows(128, lengths=(9, 14, 5, 11))
    padded = collate(rows, pad_id=0, task="causal")
    loss_ref, n_ref = causal_loss_sum(model, padded)
    grads_ref = _grads(model, loss_ref / n_ref)
    if variant == "optimize":
        lorakit.optimize(model)
    model.train()
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = collate_packed(rows, pad_id=0, budget=48)
    loss, n = pa.packed_loss_sum(model, packed)
    assert n == n_ref == sum(len(r.input_ids) - 2 for r in rows)  # the same targets: the step's mean agrees
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = _grads(model, loss / n)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


def test_parts_split_rows_across_processes_and_sum_to_the_whole(tiny_llama):
    model = _adapted(tiny_llama)
    rows = _rows(128, lengths=(9, 14, 5, 11, 3))
    whole = collate_packed(rows, pad_id=0, budget=48)
    split = collate_packed(rows, pad_id=0, budget=48, parts=2)
    assert split["input_ids"].shape[0] == 2
    # longest first onto the lighter part: 14+5+3 / 11+9
    assert sorted(int(t) for t in (split["document_ids"] >= 0).sum(1)) == [20, 22]
    loss, n = pa.packed_loss_sum(model, whole)
    grads = _grads(model, loss)
    parts = [pa.packed_loss_sum(model, {k: v[r:r + 1] for k, v in split.items()}) for r in range(2)]
    assert sum(p[1] for p in parts) == n
    torch.testing.assert_close(sum(p[0] for p in parts), loss, rtol=1e-5, atol=1e-5)
    for name, g in _grads(model, sum(p[0] for p in parts)).items():  # what DDP's all-reduce adds up
        torch.testing.assert_close(g, grads[name], rtol=1e-4, atol=1e-6)


def test_best_fit_decreasing_fills_bins_and_never_splits_a_row():
    lengths = [90, 10, 50, 60, 40, 5, 45, 100, 30, 70]
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 5  # 500 tokens: 5 full bins, the lower bound
    with pytest.raises(ConfigError, match="row 7 has 100 tokens"):
        best_fit_decreasing(lengths, 99)


def test_packed_batches_shuffle_bins_per_epoch_deterministically():
    rows = _rows(128, lengths=[5 + (7 * i) % 23 for i in range(40)])
    a, b = PackedBatches(rows, 64, seed=3, pad_id=0), PackedBatches(rows, 64, seed=3, pad_id=0)
    first = [a[i]["input_ids"] for i in range(a.per_epoch)]
    assert all(torch.equal(x, b[i]["input_ids"]) for i, x in enumerate(first))
    assert all(x.shape == (1, 64) for x in first)  # one fixed shape
    second = [a[a.per_epoch + i]["input_ids"] for i in range(a.per_epoch)]
    assert any(not torch.equal(x, y) for x, y in zip(first, second))  # another order next epoch
    real = sum(int((a[i]["document_ids"] >= 0).sum()) for i in range(a.per_epoch))
    assert real == sum(len(r.input_ids) for r in rows)  # every row once per epoch


def _run(tiny_dir, data, out, **kw):
    base = dict(model=str(tiny_dir), data=str(data), output_dir=str(out), batch_size=4, lr=2e-2, r=4,
                quiet=True, warmup=2, score="none", max_new_tokens=2, eval_examples=4)
    return lorakit.train(**{**base, **kw})


def _varied_rows(n: int) -> list[dict]:
    rows = copy_task_rows(n)
    for i, r in enumerate(rows):  # lengths that vary a lot, as in real instruction data
        r["completion"] = r["completion"] * (1 + i % 5)
    return rows


def test_packed_run_records_tokens_and_resumes_bitwise(tmp_path):
    tiny_dir = save_tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", _varied_rows(60))
    opts = dict(max_steps=8, grad_accum=2, checkpoint_every=3, lora_dropout=0.1, packing=True)
    full = _run(tiny_dir, data, tmp_path / "a", **opts)
    padded = _run(tiny_dir, data, tmp_path / "p", max_steps=8, grad_accum=2, packing=False)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())["train"]
    assert metrics["tokens"] > 0 and 0 <= metrics["padding_fraction"] < padded.metrics["train"]["padding_fraction"]

    class Killed(Exception):
        pass

    def kill_at_5(step, record):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _run(tiny_dir, data, tmp_path / "b", on_step=kill_at_5, **opts)
    resumed = _run(tiny_dir, data, tmp_path / "b", resume=True, **opts)
    a, b = lorakit.adapter_state_dict(full.model), lorakit.adapter_state_dict(resumed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("asked", [None, True, False])
def test_options_record_the_packing_the_run_did(tmp_path, asked):
    tiny_dir = save_tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", _varied_rows(24))
    result = _run(tiny_dir, data, tmp_path / "run", max_steps=1, packing=asked)
    recorded = json.loads((tmp_path / "run" / "options.json").read_text())
    assert recorded == result.metrics["options"]
    assert recorded["packing"] in (True, False)
    if asked is not None:
        assert recorded["packing"] is asked
    assert (recorded["pack_tokens"] > 0) == recorded["packing"]  # the budget the packed run used


def test_packing_refuses_classification(minilm_path, tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(8)])
    with pytest.raises(ConfigError, match="--packing is for --task causal"):
        _run(minilm_path, data, tmp_path / "run", task="classify", packing=True, max_steps=1)


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                           enable_gqa=False):
    """torch's varlen_attn (torch 2.13's signature) for CPU: sdpa segment by segment. q [T, H, D]."""
    out = torch.empty_like(q)
    for a, b in zip(cu_q.tolist(), cu_q[1:].tolist()):
        seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, t, D]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            *seg, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


def test_varlen_attention_function_keeps_rows_apart(tiny_llama, monkeypatch):
    """The GPU seam on CPU: transformers runs "lorakit_varlen" with the packed batch's cumulative lengths;
    torch's varlen_attn (CUDA only) is stood in for by sdpa per segment."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen_attn)
    assert pa.install_varlen(tiny_llama)  # its probe passed
    assert tiny_llama.config._attn_implementation == pa.VARLEN and pa.choose_path(tiny_llama) == "varlen"
    rows = _rows(128)
    batch = collate_packed(rows, pad_id=0, budget=32, parts=2)
    with torch.no_grad():
        logits = tiny_llama(**pa.packed_inputs(tiny_llama, batch)).logits
        padded = tiny_llama(**{k: v for k, v in collate(rows, 0, "causal").items() if k != "labels"}).logits
    for part in range(2):
        docs = batch["document_ids"][part]
        for d in range(int(docs.max()) + 1):
            ids = batch["input_ids"][part][docs == d].tolist()
            row = next(i for i, r in enumerate(rows) if r.input_ids == ids)
            torch.testing.assert_close(logits[part][docs == d], _alone(tiny_llama, rows[row]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded[row, :len(ids)], _alone(tiny_llama, rows[row]), rtol=1e-5, atol=1e-5)


def test_padding_to_a_multiple_changes_shapes_not_the_step(tiny_llama):
    """collate's pad_multiple (padded runs on CUDA round T up to 64): the loss, its target count and the adapter
    gradients equal those of the tightest padding; only T grows."""
    model = _adapted(tiny_llama)
    rows = _rows(128, lengths=(9, 14, 5, 11))
    tight = collate(rows, pad_id=0, task="causal")
    rounded = collate(rows, pad_id=0, task="causal", pad_multiple=16)
    assert tight["input_ids"].shape == (4, 14) and rounded["input_ids"].shape == (4, 16)
    assert torch.equal(rounded["attention_mask"].sum(1), tight["attention_mask"].sum(1))
    assert (rounded["labels"][:, 14:] == IGNORE).all()
    loss_ref, n_ref = causal_loss_sum(model, tight)
    grads_ref = _grads(model, loss_ref / n_ref)
    loss, n = causal_loss_sum(model, rounded)
    assert n == n_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = _grads(model, loss / n)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field", ["attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"])
def test_no_varlen_attention_for_a_model_with_attention_dropout(tiny_llama, monkeypatch, field):
    """The probe runs in eval mode (no dropout); training would then meet varlen's missing attention dropout."""
    installs = []
    monkeypatch.setattr(pa, "varlen_available", lambda device: True)
    monkeypatch.setattr(pa, "install_varlen", lambda model, dtype=None: installs.append(model) or True)
    setattr(tiny_llama.config, field, 0.1)
    assert not pa.use_varlen_attention(tiny_llama) and installs == []
    setattr(tiny_llama.config, field, 0.0)
    tiny_llama.config.attention_dropout = 0.0
    assert pa.use_varlen_attention(tiny_llama) and len(installs) == 1  # the same model without dropout: varlen


def test_the_varlen_probe_runs_in_the_training_dtype(tiny_llama, monkeypatch):
    """Flash varlen takes only fp16/bf16: a bf16 run probes it under bf16 autocast, as its steps call it."""
    import torch.nn.attention.varlen as varlen

    seen = []

    def recording(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return _reference_varlen_attn(q, k, v, *args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", recording)
    pa.install_varlen(tiny_llama, torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}


def test_resume_with_automatic_packing_matches_the_resolved_record(tmp_path):
    """options.json and checkpoints record the packing the run resolved: resuming with packing left automatic
    is the same run; asking for the other packing is refused."""
    from lorakit.errors import CheckpointError

    tiny_dir = save_tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", _varied_rows(24))
    first = _run(tiny_dir, data, tmp_path / "run", max_steps=3, checkpoint_every=1)
    resolved = first.metrics["options"]["packing"]
    assert resolved in (True, False)
    with pytest.raises(CheckpointError, match="--packing"):
        _run(tiny_dir, data, tmp_path / "run", max_steps=3, checkpoint_every=1, resume=True, packing=not resolved)
    again = _run(tiny_dir, data, tmp_path / "run", max_steps=3, checkpoint_every=1, resume=True)
    assert again.metrics["options"]["packing"] == resolved
