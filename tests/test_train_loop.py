"""lorakit.train: the loop on tiny models — learning, loss masks, data formats, resume, hooks, variants."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, DataError
from lorakit.loading import rows as D
from lorakit.train.batches import MicroBatches
from lorakit.train.run import resolve_options
from lorakit.train.adapter_options import adapter_variants, build_adapter_config
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", copy_task_rows(96)), write_jsonl(d / "eval.jsonl", copy_task_rows(16, seed=1))


def _quick(tiny_dir, data, tmp_path, **kw):
    base = dict(model=str(tiny_dir), data=str(data[0]), eval_data=str(data[1]), output_dir=str(tmp_path / "run"),
                max_steps=24, batch_size=8, lr=2e-2, r=8, target_modules=["all-linear"], quiet=True, warmup=2, max_new_tokens=4)
    base.update(kw)
    return lorakit.train(**base)


def test_train_learns_and_changes_only_the_adapter(tiny_dir, copy_data, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _quick(tiny_dir, copy_data, tmp_path, score="exact")
    m = result.metrics
    assert m["after"]["eval_loss"] < 0.7 * m["before"]["eval_loss"]
    losses = [h["loss"] for h in m["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    # only adapter tensors moved: the base weights equal the saved model's
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with lorakit.disabled(result.model):
        sd = result.model.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(sd[key].cpu(), value), key  # (a GPU host trains on the GPU)
    out = result.output_dir
    for name in ("metrics.json", "loss_curve.png", "generations.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "options.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["exact_match"] == m["after"]["exact_match"]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_kill_gives_the_same_adapter_bitwise(tiny_dir, copy_data, tmp_path):
    opts = dict(max_steps=12, grad_accum=2, batch_size=4, checkpoint_every=4, lora_dropout=0.1, eval_every=5,
                score="none")
    full = _quick(tiny_dir, copy_data, tmp_path / "a", **opts)

    class Killed(Exception):
        pass

    def kill_at_10(step, record):
        if step == 10:
            raise Killed  # after the checkpoint at step 8: steps 9-10 are lost, as in a real crash

    with pytest.raises(Killed):
        _quick(tiny_dir, copy_data, tmp_path / "b", on_step=kill_at_10, **opts)
    ckpts = sorted((tmp_path / "b" / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000008"]
    resumed = _quick(tiny_dir, copy_data, tmp_path / "b", resume=True, **opts)
    a = lorakit.adapter_state_dict(full.model)
    b = lorakit.adapter_state_dict(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the history has every step's loss exactly once
    steps = [h["step"] for h in resumed.metrics["history"] if "loss" in h]
    assert steps == sorted(set(steps))
    # the history and the run's totals are those of the uninterrupted run (all but the speeds, which are timed)
    def untimed(history):
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]

    assert untimed(resumed.metrics["history"]) == untimed(full.metrics["history"])
    for key in ("steps", "tokens", "padding_fraction", "final_loss"):
        assert resumed.metrics["train"][key] == full.metrics["train"][key], key


def test_resume_without_checkpoint_is_a_clear_error(tiny_dir, copy_data, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        _quick(tiny_dir, copy_data, tmp_path, resume=True)


def test_training_hooks_are_called(tiny_dir, copy_data, tmp_path, monkeypatch):
    from lorakit.core import registry

    calls = {"extra": 0, "after": [], "save": 0}

    class Hook:
        def __init__(self, model, name, config):
            self.params = [p for n, p in model.named_parameters() if p.requires_grad]

        def extra_loss(self):
            calls["extra"] += 1
            return 1e-3 * sum(p.pow(2).sum() for p in self.params)

        def after_step(self, step):
            calls["after"].append(step)

        def on_save(self):
            calls["save"] += 1

    monkeypatch.setitem(registry.TRAINING_HOOKS, "LORA", Hook)
    _quick(tiny_dir, copy_data, tmp_path, max_steps=5, grad_accum=2, score="none")
    assert calls["after"] == [0, 1, 2, 3, 4]
    assert calls["extra"] == 10  # once per micro-batch
    assert calls["save"] == 1


def test_loss_only_on_completion_tokens(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = D.Encoder(tok, "causal")
    e = enc.encode({"prompt": "copy: red blue =>", "completion": " red blue"})
    n_prompt = len(tok("copy: red blue =>")["input_ids"])
    assert e.labels[:n_prompt] == [D.IGNORE] * n_prompt
    assert tok.decode([t for t in e.labels if t != D.IGNORE]) == " red blue<|im_end|>"
    assert e.prompt_ids == e.input_ids[:n_prompt]
    # Alpaca rows use the Alpaca template; the loss covers only the output
    a = enc.encode({"instruction": "Name a color.", "input": "", "output": "teal"})
    assert "### Response:" in tok.decode(a.prompt_ids)
    assert tok.decode([t for t in a.labels if t != D.IGNORE]) == "teal<|im_end|>"
    # chat rows: every assistant turn is learned, nothing else
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "blue"}]}
    c = enc.encode(chat)
    learned = tok.decode([t for t in c.labels if t != D.IGNORE])
    assert learned == "red<|im_end|>blue<|im_end|>"  # the template's newline after <|im_end|> is not learned
    assert c.reference == "blue"
    assert tok.decode(c.prompt_ids).endswith("again<|im_end|>\n<|im_start|>assistant\n")


def test_data_files_csv_tsv_jsonl_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text('prompt,completion\n"x, y",z\n')
    (tmp_path / "b.tsv").write_text("sentence\tlabel\nit 's good . \t1\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "hello"}]))
    assert D.read_rows(tmp_path / "a.csv") == [{"prompt": "x, y", "completion": "z"}]
    assert D.detect_format(D.read_rows(tmp_path / "b.tsv")[0], "classify") == "classify"
    assert D.detect_format(D.read_rows(tmp_path / "c.json")[0], "causal") == "text"
    with pytest.raises(DataError, match="cannot tell the data format"):
        D.detect_format({"question": "q"}, "causal")
    with pytest.raises(DataError, match="does not exist"):
        D.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl line 1 column 2: not valid JSON"):
        D.read_rows(tmp_path / "bad.jsonl")


def test_micro_batches_are_deterministic_and_cover_the_data():
    examples = [D.Example([i, i], [i, i]) for i in range(10)]
    mb = MicroBatches(examples, 3, seed=5, pad_id=0, task="causal")
    assert mb.per_epoch == 3
    first = [mb[i]["input_ids"][:, 0].tolist() for i in range(3)]
    again = MicroBatches(examples, 3, seed=5, pad_id=0, task="causal")
    assert [again[i]["input_ids"][:, 0].tolist() for i in range(3)] == first
    assert len({x for b in first for x in b}) == 9  # one epoch: 9 distinct examples (the remainder dropped)
    assert mb[3]["input_ids"][:, 0].tolist() != first[0]  # the next epoch is reshuffled


def test_variants_come_from_the_registry():
    names = adapter_variants()
    assert "lora" in names
    opts, given = resolve_options(data="x.jsonl", adapter="lora", r=4, adapter_options={"use_rslora": True})
    cfg = build_adapter_config(opts, "causal", given)
    assert cfg.r == 4 and cfg.use_rslora and cfg.target_modules == "all-linear"
    opts, given = resolve_options(data="x.jsonl", adapter="nope")
    with pytest.raises(ConfigError, match="registered"):
        build_adapter_config(opts, "causal", given)
    opts, given = resolve_options(data="x.jsonl", adapter_options={"no_such_field": 1})
    with pytest.raises(ConfigError, match="no option"):
        build_adapter_config(opts, "causal", given)


def test_builtin_recipe_ranks_below_user_settings(tmp_path):
    opts, _ = resolve_options()
    assert opts.data is None and opts.lr == 2e-3 and opts.train_examples > 0
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.0005\nbatch-size: 4\n")
    opts, _ = resolve_options(config=str(cfg), batch_size=2)
    assert opts.lr == 5e-4 and opts.batch_size == 2
    opts, _ = resolve_options(data="mine.jsonl")
    assert opts.lr == 1e-3 and opts.train_examples == 0  # plain defaults with user data


def test_classify_with_minilm(minilm_path, tmp_path):
    rows = [{"text": f"{w} movie", "label": int(w in ("great", "superb", "lovely"))}
            for w in ("great", "awful", "superb", "bad", "lovely", "boring") * 8]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    result = lorakit.train(model=minilm_path, data=str(data), eval_data=str(data), task="classify",
                           target_modules=["query", "value"], max_steps=8, lr=5e-3, batch_size=16, quiet=True,
                           output_dir=str(tmp_path / "run"))
    m = result.metrics
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"]
    assert m["after"]["accuracy"] >= 0.9
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "classifier" in cfg["modules_to_save"]


def test_adapted_model_trains_under_hf_trainer(tmp_path):
    """A lorakit-adapted model is a plain nn.Module to transformers' Trainer: no wrapper, no special casing."""
    from torch.utils.data import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)  # initializer_range 0.3: a random lm_head that can express sharp predictions
    tiny_llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              initializer_range=0.3))
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, 128, (16, 24), generator=g)

    class Repeat(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"input_ids": fixed[i % 16], "labels": fixed[i % 16]}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=tiny_llama, args=args, train_dataset=Repeat())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".deltas.default.lora_" in n for n in changed)
    assert changed == {n for n, p in tiny_llama.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_gpu(tiny_dir, copy_data, tmp_path):
    result = _quick(tiny_dir, copy_data, tmp_path, device="cuda", score="none", gradient_checkpointing=True)
    m = result.metrics
    assert m["device"].startswith("cuda") and m["options"]["precision"] == "auto"
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"]
    assert all(p.dtype == torch.float32 for p in lorakit.adapter_state_dict(result.model).values())


def test_gradient_checkpointing_gives_the_same_adapter(tiny_dir, copy_data, tmp_path):
    plain = _quick(tiny_dir, copy_data, tmp_path / "a", max_steps=4, score="none")
    ckpt = _quick(tiny_dir, copy_data, tmp_path / "b", max_steps=4, score="none", gradient_checkpointing=True)
    a, b = lorakit.adapter_state_dict(plain.model), lorakit.adapter_state_dict(ckpt.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
