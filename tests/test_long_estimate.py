"""`lorakit estimate --max-context`: the long-context memory account (weights counted exactly for a known
shape, per-token terms from the architecture, the answer monotone in memory) and its CLI."""

from __future__ import annotations

import pytest

from lorakit.cli import app as cli
from lorakit.errors import ConfigError
from lorakit.train.context_estimate import GIB, estimate_max_context, weight_bytes
from lorakit.train.estimate import NF4_BITS, shape_of


def test_llama_3_8b_weight_bytes_exactly():
    shape = shape_of("llama-3-8b")
    h, i, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    block_linears = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    rest = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, head; two norms per layer and the final one
    assert shape.params == block_linears + rest == 8_030_261_248  # Llama-3-8B's published count
    assert weight_bytes(shape, 16) == 2 * shape.params
    assert weight_bytes(shape, 4) == pytest.approx(block_linears * NF4_BITS / 8 + 2 * rest, rel=1e-12)
    assert weight_bytes(shape, 4) < weight_bytes(shape, 8) < weight_bytes(shape, 16) < weight_bytes(shape, 32)


def test_per_token_terms_follow_the_architecture():
    est = estimate_max_context("llama-3-8b", r=16, bits=4)
    h, kv, head_dim, r, modules = 4096, 1024, 128, 16, 7
    expected = (2 * h * 5  # block input, two residual gradients, attention output and its gradient (bf16)
                + 2 * 2 * (h + 2 * kv)  # q, k, v saved and their gradients
                + 4 * h  # flash's fp32 dq accumulator
                + 2 * 2 * h  # dk, dv per query head (8 KV heads for 32 query heads)
                + 2 * 2 * head_dim + 2 * r * modules + 36)
    assert est.bytes_per_token == expected
    terms = {t.name: t.size for t in estimate_max_context("llama-2-7b", r=16, bits=4).per_token}
    assert terms["flash backward: dk, dv per query head"] == 0  # no grouped KV heads: nothing to sum


def test_longest_context_fits_and_one_more_token_does_not():
    est = estimate_max_context("llama-3-8b", r=16, bits=4, gpu_memory_gib=80)
    t = est.max_tokens
    assert est.peak_bytes(t) <= 80 * GIB < est.peak_bytes(t + 1)
    # the target: 700k tokens of QLoRA and 600k of bf16 LoRA in 80 GiB
    assert t >= 700_000
    assert estimate_max_context("llama-3-8b", r=16, bits=16, gpu_memory_gib=80).max_tokens >= 600_000


def test_monotone_in_memory_bits_and_rank():
    by_memory = [estimate_max_context("llama-3-8b", r=16, bits=4, gpu_memory_gib=g).max_tokens
                 for g in (24, 40, 80, 141)]
    assert by_memory == sorted(by_memory) and len(set(by_memory)) == 4
    nf4 = estimate_max_context("llama-3-8b", r=16, bits=4)
    bf16 = estimate_max_context("llama-3-8b", r=16, bits=16)
    assert nf4.fixed_bytes < bf16.fixed_bytes and nf4.max_tokens > bf16.max_tokens
    assert nf4.bytes_per_token == bf16.bytes_per_token  # activations are bf16 either way
    assert estimate_max_context("llama-3-8b", r=64, bits=4).max_tokens < nf4.max_tokens
    # a model too large for the card: nothing fits
    assert estimate_max_context("llama-3-70b", r=16, bits=16, gpu_memory_gib=80).max_tokens == 0


@pytest.mark.parametrize("kw", [dict(gpu_memory_gib=0), dict(gpu_memory_gib=-8), dict(gpu_memory_gib=float("inf")),
                                dict(gpu_memory_gib=float("nan")), dict(r=0), dict(bits=3),
                                dict(targets=["no_such_layer"])])
def test_bad_input_is_a_config_error(kw):
    with pytest.raises(ConfigError):
        estimate_max_context("llama-3-8b", **kw)


def test_cli_prints_the_account(capsys):
    code = cli.main(["estimate", "--max-context", "--model", "llama-3-8b", "--r", "16", "--targets", "all-linear",
                     "--bits", "4", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert code == 0
    assert "flash backward: fp32 dq accumulator" in out and "frozen weights" in out
    tokens = estimate_max_context("llama-3-8b", r=16, bits=4, gpu_memory_gib=80).max_tokens
    assert f"longest context: {tokens:,} tokens" in out
    assert "host memory" in out


@pytest.mark.parametrize("argv", [["--gpu-memory", "0"], ["--gpu-memory", "inf"], ["--gpu-memory", "lots"],
                                  ["--model", "no-such-model"], ["--bits", "3"]])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv):
    code = cli.main(["estimate", "--max-context", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err and "Traceback" not in err


@pytest.mark.parametrize("argv, on", [([], "all-linear"), (["--targets", "q_proj", "v_proj"], "q_proj,v_proj")])
def test_cli_max_context_targets_all_linear_unless_given(capsys, argv, on):
    assert cli.main(["estimate", "--max-context", "--model", "llama-3-8b", *argv]) == 0
    assert f"LoRA r=8 on {on}," in capsys.readouterr().out.splitlines()[0]
    assert cli.main(["estimate", "--model", "llama-3-8b"]) == 0  # without --max-context: q_proj, v_proj
    assert "LoRA r=8 on q_proj,v_proj:" in capsys.readouterr().out
