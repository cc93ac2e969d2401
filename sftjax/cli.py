"""The ``sftjax`` command line.

Each subcommand lives in the module that owns the feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and turns user errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help). Modules are imported only when their subcommand runs.
COMMANDS = {
    "train": ("sftjax.train.cli", "fine-tune a model from a YAML config"),
    "eval": ("sftjax.train.cli_eval", "evaluate a model on a config's eval data"),
    "data": ("sftjax.data.preview", "inspect a dataset: `sftjax data preview CONFIG`"),
    "generate": ("sftjax.generate", "generate text from a prompt with a model"),
    "export": ("sftjax.export", "export a run or checkpoint to hf / peft / gguf"),
    "chat": ("sftjax.chat_cli", "talk with a model in the terminal (multi-turn, its chat template)"),
    "plan": ("sftjax.plan", "estimate a config's memory per device and step time without training"),
}


def _available_commands() -> dict:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sftjax", description="Supervised fine-tuning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _available_commands()
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    from sftjax.errors import SftjaxError

    try:
        return int(importlib.import_module(commands[args.command][0]).run(args) or 0)
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
