"""``sftjax eval CONFIG [overrides]``: loss, perplexity and token accuracy of a model on a config's eval data.

Point ``model.path`` at a trained output (e.g. ``model.path=runs/x/final``) to evaluate it.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config whose data section has eval data")
    parser.add_argument("overrides", nargs="*", help="overrides such as model.path=runs/x/final")


def run(args: argparse.Namespace) -> int:
    from sftjax.config import load_config
    from sftjax.errors import ConfigError
    from sftjax.train.trainer import Trainer

    cfg = load_config(args.config, overrides=args.overrides)
    trainer = Trainer(cfg)
    if trainer.eval_data is None:
        raise ConfigError("data: no eval data; set data.eval_sources or data.eval_fraction")
    print(json.dumps(trainer.evaluate(), indent=2))
    return 0
