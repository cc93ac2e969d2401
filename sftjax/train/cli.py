"""``sftjax train CONFIG [key.sub=value ...]``: fine-tune from a YAML config."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="overrides such as optim.learning_rate=1e-4 train.steps=50")


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from sftjax.config import load_config  # validated before jax compiles anything
    from sftjax.train.trainer import Trainer

    cfg = load_config(args.config, overrides=args.overrides)
    trainer = Trainer(cfg)
    result = trainer.fit()
    print(json.dumps({"steps": trainer.total_steps, "output_dir": cfg.train.output_dir, **result}, indent=2))
    return 0
