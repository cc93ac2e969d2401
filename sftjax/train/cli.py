"""``sftjax train CONFIG [key.sub=value ...]``: fine-tune from a YAML config, checkpointing and resuming.

The run checkpoints into ``<train.output_dir>/checkpoints`` (``checkpoint:`` section) and, with the default
``checkpoint.resume=auto``, rerunning the same command continues from the newest complete checkpoint. SIGTERM or
SIGINT writes a checkpoint and exits 0; a run whose final checkpoint exists is reported complete, not retrained.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

from sftjax.config import load_config
from sftjax.errors import ConfigError
from sftjax.infer.evaluate import answer_matcher
from sftjax.train.distributed import initialize
from sftjax.train.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="overrides such as optim.learning_rate=1e-4 train.steps=50 "
                                                     "checkpoint.save_every_steps=100 checkpoint.resume=never")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter; sftjax logs each save itself

    cfg = load_config(args.config, overrides=args.overrides)
    initialize(cfg.train.distributed)  # join a multi-process job before anything touches the devices
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
    parser.add_argument("overrides", nargs="*", help="overrides such as data.eval_fraction=0.05")
    parser.add_argument("--from", dest="source", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="what to evaluate: a run directory, a checkpoint, or a model (HF directory, .gguf, "
                             "alias); default: the config's train.output_dir")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the config's model as built, untrained (a baseline); nothing is loaded")
    parser.add_argument("--generate", action="store_true",
                        help="decode the eval prompts and report answer accuracy (see --answer)")
    parser.add_argument("--answer", default="exact", help="how answers compare: exact | number | gsm8k | "
                                                          "regex:PATTERN (default exact)")
    parser.add_argument("--limit", type=int, default=None, help="score at most N eval examples (--generate)")
    parser.add_argument("--predictions", default=None, metavar="FILE",
                        help="write one JSON line per example (prompt, prediction, target, correct)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (--generate)")


def run_eval(args: argparse.Namespace) -> int:
    """``sftjax eval CONFIG [overrides]``: what was trained, evaluated on the config's eval data: loss, perplexity
    and token accuracy, or with ``--generate`` the accuracy of decoded answers."""

    cfg = load_config(args.config, overrides=args.overrides)
    initialize(cfg.train.distributed)
    if args.random_init and args.source:
        raise ConfigError("eval: give --from or --random-init, not both")
    if args.generate:
        answer_matcher(args.answer)  # a bad --answer fails before anything is built
    trainer = Trainer.for_evaluation(cfg, source=None if args.random_init else (args.source or cfg.train.output_dir))
    if trainer.eval_data is None:
        raise ConfigError("data: no eval data; set data.eval_sources or data.eval_fraction")
    if not args.generate:
        print(json.dumps({"evaluated": trainer.evaluated_from, **trainer.evaluate()}, indent=2))
        return 0
    result = trainer.evaluate_generation(answer=args.answer, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, predictions=args.predictions)
    print(json.dumps({"evaluated": trainer.evaluated_from, **result}, indent=2))
    print(f"accuracy: {result['accuracy']:.4f}")
    return 0
