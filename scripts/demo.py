"""The sftjax demo: give SmolLM2-135M-Instruct a new identity with LoRA on the CPU, and show the change.

    python scripts/demo.py [--name Kestrel] [--author "the sftjax team"] [overrides such as train.steps=30]

1. Fills the ``{{name}}`` / ``{{author}}`` placeholders of the identity dataset (shared assets,
   ``datasets/chat/identity.json``) and writes it next to the run (``runs/smollm2_identity/identity.jsonl``).
2. Asks the base model a few questions about itself that are **not** in the training data (new phrasings).
3. Fine-tunes it with LoRA (``configs/smollm2_identity_cpu.yaml``), with the eval loss of the held-out rows before
   and after; checkpoints make a rerun reuse the finished run instead of training again.
4. Asks the same questions again and prints both answers side by side, where the model was saved and what to
   run next.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_identity_cpu.yaml"
QUESTIONS = [  # none of these is in identity.json
    "What should I call you?",
    "Which team made you, and what is your name?",
    "Are you ChatGPT?",
    "Tell me briefly who you are.",
]


def assets_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SFTJAX_ASSETS", REPO.parent / "shared" / "assets"))
    if not (path / "datasets" / "chat" / "identity.json").is_file():
        sys.exit(f"demo: error: {path}/datasets/chat/identity.json is missing; put the shared assets in "
                 "../shared/assets beside the checkout or set SFTJAX_ASSETS=/path/to/assets")
    return path


def write_identity_data(target: pathlib.Path, name: str, author: str) -> int:
    rows = json.loads((assets_dir() / "datasets" / "chat" / "identity.json").read_text(encoding="utf-8"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for row in rows:
            filled = {k: v.replace("{{name}}", name).replace("{{author}}", author) for k, v in row.items()}
            handle.write(json.dumps(filled, ensure_ascii=False) + "\n")
    return len(rows)


def answers(model, tokenizer, questions: list[str]) -> list[str]:
    """Greedy answers to each question, decoded together."""
    from sftjax.infer.generate import generate_batch_ids, render_prompt_ids, stop_token_ids

    stops = stop_token_ids(tokenizer, model.config)
    prompts = [render_prompt_ids(tokenizer, q) for q in questions]
    out = generate_batch_ids(model, prompts, max_new_tokens=48, stop_ids=stops)
    return [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True).strip() for ids in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="Kestrel")
    parser.add_argument("--author", default="the sftjax team")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=30")
    args = parser.parse_args()
    started = time.perf_counter()

    import logging

    import sftjax
    from sftjax.config import read_yaml
    from sftjax.train.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, force=True)
    output_dir = pathlib.Path(read_yaml(CONFIG)["train"]["output_dir"])
    for override in args.overrides:
        if override.startswith("train.output_dir="):
            output_dir = pathlib.Path(override.split("=", 1)[1])
    data_path = output_dir / "identity.jsonl"
    count = write_identity_data(data_path, args.name, args.author)
    cfg = sftjax.load_config(CONFIG, [f"data.sources=[{{path: {data_path}, format: alpaca}}]", *args.overrides])
    print(f"==> identity data: {count} rows with name={args.name!r}, author={args.author!r} -> {data_path}", flush=True)

    trainer = Trainer(cfg)
    print(f"==> model {cfg.model.path}: {trainer.num_params / 1e6:.1f}M parameters, LoRA r={cfg.lora.r} trains "
          f"{trainer.num_trainable / 1e6:.2f}M; {trainer.total_steps} steps of {cfg.train.global_batch_size} "
          f"packed rows x {cfg.data.max_length} tokens", flush=True)
    before = answers(trainer.updated_model(), trainer.tokenizer, QUESTIONS)
    eval_before = trainer.evaluate()["loss"]
    try:
        restored = trainer.open_checkpoints()
        if restored is not None and restored.step >= trainer.total_steps:
            print(f"==> reusing the finished run in {output_dir} (delete it to train again)", flush=True)
            eval_after = trainer.evaluate()["loss"]
        else:
            print("==> training (metrics in metrics.jsonl)", flush=True)
            eval_after = trainer.fit()["eval"]["loss"]
    finally:
        trainer.close_checkpoints()
    after = answers(trainer.updated_model(), trainer.tokenizer, QUESTIONS)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M-Instruct before and after {trainer.total_steps} LoRA steps "
                        "(questions not in the training data)", show_lines=True)
    for column in ("question", "before", "after"):
        table.add_column(column, overflow="fold")
    for question, old, new in zip(QUESTIONS, before, after):
        table.add_row(question, old, new)
    console = Console()
    console.print(table)
    final = output_dir / "final"
    learned = sum(args.name.lower() in a.lower() for a in after)
    print(f"eval loss on the held-out identity rows: {eval_before:.3f} before -> {eval_after:.3f} after")
    print(f"answers naming {args.name!r}: {sum(args.name.lower() in b.lower() for b in before)}/{len(QUESTIONS)} "
          f"before, {learned}/{len(QUESTIONS)} after")
    print(f"the fine-tuned model (merged, Hugging Face format) is in {final}")
    print("next:")
    print(f"  sftjax chat {final}")
    print(f"  sftjax export {output_dir} out/kestrel-gguf --format gguf   # or --format hf / peft")
    print(f"  sftjax eval {CONFIG.relative_to(REPO)} --from {output_dir}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
