"""The ``sftjax`` command line.

Each subcommand lives in the module that owns the feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and turns user errors into one-line messages. Only the
module of the subcommand being run is imported (``sftjax --help`` imports none, so it starts without jax).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> ("module" or "module:name", help). The module defines add_arguments(parser) and run(args), or, with
# ":name", add_<name>_arguments and run_<name>.
COMMANDS = {
    "train": ("sftjax.train.cli", "fine-tune a model from a YAML config"),
    "eval": ("sftjax.train.cli:eval", "evaluate a trained run (or a model) on a config's eval data"),
    "data": ("sftjax.data.preview", "inspect a dataset: `sftjax data preview CONFIG`"),
    "generate": ("sftjax.infer.generate", "generate text from a prompt with a model"),
    "export": ("sftjax.export", "export a run or checkpoint to hf / peft / gguf"),
    "chat": ("sftjax.infer.chat", "talk with a model in the terminal (multi-turn, its chat template)"),
    "plan": ("sftjax.plan.cli", "estimate a config's memory per device and step time without training"),
}


def _entry_points(target: str):
    """(add_arguments, run) of a COMMANDS target."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    if name:
        return getattr(module, f"add_{name}_arguments"), getattr(module, f"run_{name}")
    return module.add_arguments, module.run


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the command (argparse prints the whole usage block otherwise)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="sftjax", description="Supervised fine-tuning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    runners = {}
    for name, (target, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            add_arguments, runners[name] = _entry_points(target)
            add_arguments(command_parser)
    args = parser.parse_args(argv)
    from sftjax.errors import SftjaxError

    try:
        return int(runners[args.command](args) or 0)
    except SftjaxError as err:
        if os.environ.get("SFTJAX_DEBUG"):
            raise
        print(f"sftjax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
