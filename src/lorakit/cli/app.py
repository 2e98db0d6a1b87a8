"""The `lorakit` command line: subcommands built from typed options dataclasses.

A subcommand is a name → (options dataclass, function taking the options). Any module can add one:

    from lorakit.cli import register_command
    register_command("compose", ComposeOptions, run_compose, "Combine adapters ...")

or, to keep `lorakit --help` fast, with "module:attribute" strings that are imported only when the
command runs. Every option is a flag named after the attribute (`--lora-alpha`), documented by the
attribute's docstring, and settable from a YAML/JSON file given with `--config`; flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from .. import __version__
from ..errors import LorakitError
from ..train.fields import build_options, field_docs, field_types, read_config_file, unwrap_optional


@dataclass
class Command:
    """A registered subcommand: its options dataclass and its function (objects, or lazy 'module:attr' strings)."""

    options: Union[type, str]  # an options dataclass, or "module:Class"
    run: Union[Callable[[Any], Any], str]  # a function of the options, or "module:function"
    help: str = ""
    # Optional: settings given by the user (file + flags) → defaults that depend on them (e.g. the built-in
    # task's recipe when no --data is given); they rank below the file and the flags.
    presets: Union[Callable[[dict], dict], str, None] = None

    def resolve(self) -> tuple[type, Callable[[Any], Any]]:
        """(options class, run function), imported where given as "module:attribute" strings."""
        return _load(self.options), _load(self.run)


COMMANDS: dict[str, Command] = {}


def register_command(name: str, options: Union[type, str], run: Union[Callable, str], help: str = "",
                     presets: Union[Callable[[dict], dict], str, None] = None) -> None:
    """Add (or replace) a `lorakit NAME` subcommand."""
    COMMANDS[name] = Command(options, run, help, presets)


def _load(ref):
    """A "module:attribute" reference imported (anything else is returned as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# The built-in commands, as "module:attribute" strings: `lorakit --help` imports only their options modules.
_RUN, _OPT = "lorakit.cli.commands", "lorakit.cli.options"
register_command("train", "lorakit.train.options:TrainOptions", f"{_RUN}:run_train",
                 "Fine-tune a model with an adapter (no arguments: the built-in demo task).",
                 presets="lorakit.train.task:preset_for")
register_command("eval", f"{_OPT}:EvalOptions", f"{_RUN}:run_eval",
                 "Score a base model or an adapter: accuracy, BLEU, exact match, perplexity.")
register_command("generate", f"{_OPT}:GenerateOptions", "lorakit.cli.generate:run_generate",
                 "Generate from the base model and one or more adapters side by side.")
register_command("merge", f"{_OPT}:MergeOptions", f"{_RUN}:run_merge",
                 "Merge an adapter into its base model and save a standalone Hugging Face model.")
register_command("info", f"{_OPT}:InfoOptions", f"{_RUN}:run_info",
                 "Describe an adapter directory: type, rank, targets, parameters, size, base model.")
register_command("estimate", "lorakit.cli.estimate:EstimateOptions", "lorakit.cli.estimate:run_estimate",
                 "Fine-tuning memory estimate: frozen weights, adapter states, activations, vs full fine-tuning.")
register_command("analyze", "lorakit.cli.analyze:AnalyzeOptions", "lorakit.cli.analyze:run_analyze",
                 "What did the adapter learn? ΔW spectra and effective rank, subspace similarity between adapters, "
                 "ΔW vs W and amplification; --suggest-rank, --truncate.")
register_command("compose", "lorakit.cli.compose:ComposeOptions", "lorakit.cli.compose:compose",
                 "Compose adapters: exact weighted sum at a chosen rank; weights searched LoraHub-style on a few "
                 "examples.")
register_command("serve", "lorakit.serve.server:ServeOptions", "lorakit.serve.server:run_serve",
                 "Serve the base model and many adapters behind one OpenAI-compatible HTTP endpoint (one batch).")
register_command("export", "lorakit.export.command:ExportOptions", "lorakit.export.command:run_export",
                 "Deploy an adapter: merged GGUF for llama.cpp/Ollama, the adapter as a llama.cpp LoRA GGUF, or "
                 "checked and converted for vLLM / SGLang (--for).")


# --- options dataclass → argparse -----------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(tp: Any) -> Optional[str]:
    inner, _ = unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(inner)) + "}"
    return {int: "N", float: "X", str: "TEXT"}.get(inner)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field. Values stay strings here and are typed by fields.build_options, so that the
    config file and the flags go through the same checks. Defaults are SUPPRESSed: only given flags appear.
    A field's metadata "flag" adds a second spelling (e.g. `--for` for for_engine, a Python keyword)."""
    docs, types = field_docs(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        inner, _ = unwrap_optional(tp)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = docs.get(f.name, "")
        if default not in (None, "", [], {}) and not f.metadata.get("positional"):
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        flags = ([f.metadata["flag"]] if f.metadata.get("flag") else []) + [_flag(f.name)]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        elif inner is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(inner) in (list, dict) or inner in (list, dict):
            parser.add_argument(*flags, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=help_text,
                                metavar="VALUE")
        else:
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=help_text,
                                metavar=_metavar(tp))


def build_parser() -> argparse.ArgumentParser:
    """The `lorakit` parser: one subparser per registered command (a command whose options fail to import
    still appears, with the error in its description)."""

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, generate, "
                                     "merge, inspect and size adapters.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", default=None, metavar="FILE",
                       help="YAML or JSON file setting any option below; flags given here override it.")
        try:
            options_cls = _load(cmd.options)
        except (ImportError, AttributeError) as e:  # a broken plugin command must not break the others
            p.description = f"{cmd.help} (unavailable: {e})"
            continue
        add_options(p, options_cls)
    return parser


def parse_options(command: Command, namespace: argparse.Namespace):
    """The options instance: dataclass defaults < the command's presets < --config file < flags."""
    cls = _load(command.options)
    flags = {k: v for k, v in vars(namespace).items() if k not in ("command", "config")}
    from_file = read_config_file(namespace.config) if namespace.config else {}
    presets = _load(command.presets)({**from_file, **flags}) if command.presets else {}
    return build_options(cls, presets, from_file, flags)


def main(argv: Optional[list[str]] = None) -> int:
    """Run `lorakit ARGV...`; returns the exit code (2 for a lorakit error, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        command = COMMANDS[args.command]
        options = parse_options(command, args)
        run = _load(command.run)
        result = run(options)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0

