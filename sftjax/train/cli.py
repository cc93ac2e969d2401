"""``sftjax train CONFIG [key.sub=value ...]``: fine-tune from a YAML config, checkpointing and resuming.

The run checkpoints into ``<train.output_dir>/checkpoints`` (``checkpoint:`` section) and, with the default
``checkpoint.resume=auto``, rerunning the same command continues from the newest complete checkpoint. SIGTERM or
SIGINT writes a checkpoint and exits 0; a run whose final checkpoint exists is reported complete, not retrained.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="overrides such as optim.learning_rate=1e-4 train.steps=50 "
                                                     "checkpoint.save_every_steps=100 checkpoint.resume=never")


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter; sftjax logs each save itself
    from sftjax.config import load_config  # validated before jax compiles anything
    from sftjax.train.trainer import Trainer

    cfg = load_config(args.config, overrides=args.overrides)
    trainer = Trainer(cfg)
    try:
        restored = trainer.open_checkpoints()
        if restored is not None and restored.step >= trainer.total_steps:
            final = pathlib.Path(cfg.train.output_dir) / "final"
            if cfg.train.save != "none" and not final.exists():  # killed between final checkpoint and model
                trainer.save(final)
            print(f"sftjax: run already complete: checkpoint {restored.directory} is at step {restored.step} of "
                  f"{trainer.total_steps}; nothing to train (raise train.steps to continue, or use another "
                  "train.output_dir to start over)")
            return 0
        result = trainer.fit()
    finally:
        trainer.close_checkpoints()
    print(json.dumps({"steps": trainer.total_steps, "output_dir": cfg.train.output_dir, **result}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------- eval

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config whose data section has eval data")
    parser.add_argument("overrides", nargs="*", help="overrides such as model.path=runs/x/final")


def run_eval(args: argparse.Namespace) -> int:
    """``sftjax eval CONFIG [overrides]``: loss, perplexity and token accuracy on a config's eval data."""
    from sftjax.config import load_config
    from sftjax.errors import ConfigError
    from sftjax.train.trainer import Trainer

    cfg = load_config(args.config, overrides=args.overrides)
    trainer = Trainer(cfg)
    if trainer.eval_data is None:
        raise ConfigError("data: no eval data; set data.eval_sources or data.eval_fraction")
    print(json.dumps(trainer.evaluate(), indent=2))
    return 0
