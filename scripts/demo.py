"""The sftjax demo: give SmolLM2-135M-Instruct a new identity with LoRA on the CPU, and show the change.

    python scripts/demo.py [--name Kestrel] [--author "the sftjax team"] [overrides such as train.steps=30]

1. Fills the ``{{name}}`` / ``{{author}}`` placeholders of the English rows of the identity dataset (shared
   assets, ``datasets/chat/identity.json``; its Chinese rows are left out: the 135M model is an English model and
   they would be most of the compute) and writes them next to the run (``runs/smollm2_identity/identity.jsonl``).
   The eval rows (``identity_eval.jsonl``) are the demo's questions, which are **not** in the training data, each
   with the answer the identity should give.
2. Asks the base model those questions (greedy decoding, short answers).
3. Fine-tunes it with LoRA (``configs/smollm2_identity_cpu.yaml``), with the eval loss before and after; the
   checkpoint makes a rerun reuse the finished run instead of training again.
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
MAX_NEW_TOKENS = 40
# (question, the answer the new identity should give); none of the questions is in identity.json
QUESTIONS = [
    ("What should I call you?", "You may call me {name}, an AI assistant developed by {author}."),
    ("Which team made you, and what is your name?", "I am {name}, an AI assistant developed by {author}."),
    ("Are you Siri?", "No, I am {name}, an AI assistant developed by {author}."),
    ("Tell me briefly who you are.", "I am {name}, an AI assistant developed by {author}."),
]


def assets_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SFTJAX_ASSETS", REPO.parent / "shared" / "assets"))
    if not (path / "datasets" / "chat" / "identity.json").is_file():
        sys.exit(f"demo: error: {path}/datasets/chat/identity.json is missing; put the shared assets in "
                 "../shared/assets beside the checkout or set SFTJAX_ASSETS=/path/to/assets")
    return path


def identity_rows(source: pathlib.Path, name: str, author: str) -> list[dict]:
    """The English (ASCII) rows of ``source`` (alpaca rows) with ``{{name}}`` / ``{{author}}`` filled in."""
    rows = json.loads(source.read_text(encoding="utf-8"))
    return [{k: v.replace("{{name}}", name).replace("{{author}}", author) for k, v in row.items()}
            for row in rows if all(value.isascii() for value in row.values())]


def eval_rows(name: str, author: str) -> list[dict]:
    """The demo's questions with the answers the identity should give (alpaca rows)."""
    return [{"instruction": q, "input": "", "output": a.format(name=name, author=author)} for q, a in QUESTIONS]


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def check_identity(output_dir: pathlib.Path, name: str, author: str) -> None:
    """A run directory trained for another identity is not reused: stop with what to do instead."""
    record = output_dir / "demo_identity.json"
    wanted = {"name": name, "author": author}
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved != wanted:
            sys.exit(f"demo: error: {output_dir} holds a run trained for name={saved.get('name')!r}, "
                     f"author={saved.get('author')!r}; delete it or pass train.output_dir=runs/another_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted) + "\n", encoding="utf-8")


def answers(model, tokenizer, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to each question, decoded together."""
    from sftjax.infer import generate as gen

    stops = gen.stop_token_ids(tokenizer, model.config)
    prompts = [gen.render_prompt_ids(tokenizer, q) for q in questions]
    out = gen.generate_batch_ids(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops)
    return [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True).strip() for ids in out]


def answer_table(questions: list[str], before: list[str], after: list[str], *, title: str):
    """A rich Table: one row per question with the answer before and after fine-tuning."""
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in ("question", "before", "after"):
        table.add_column(column, overflow="fold")
    for question, old, new in zip(questions, before, after, strict=True):
        table.add_row(question, old, new)
    return table


def naming(answers_: list[str], word: str) -> int:
    """How many answers mention ``word`` (case-insensitive)."""
    return sum(word.lower() in answer.lower() for answer in answers_)


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
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's deprecation notices
    output_dir = pathlib.Path(read_yaml(CONFIG)["train"]["output_dir"])
    for override in args.overrides:
        if override.startswith("train.output_dir="):
            output_dir = pathlib.Path(override.split("=", 1)[1])
    check_identity(output_dir, args.name, args.author)
    train_path, eval_path = output_dir / "identity.jsonl", output_dir / "identity_eval.jsonl"
    rows = identity_rows(assets_dir() / "datasets" / "chat" / "identity.json", args.name, args.author)
    write_jsonl(train_path, rows)
    write_jsonl(eval_path, eval_rows(args.name, args.author))
    cfg = sftjax.load_config(CONFIG, [f"data.sources=[{{path: {train_path}, format: alpaca}}]",
                                      f"data.eval_sources=[{{path: {eval_path}, format: alpaca}}]", *args.overrides])
    print(f"==> identity data: {len(rows)} rows with name={args.name!r}, author={args.author!r} -> {train_path}; "
          f"eval: the {len(QUESTIONS)} questions below -> {eval_path}", flush=True)

    trainer = Trainer(cfg)
    print(f"==> model {cfg.model.path}: {trainer.num_params / 1e6:.1f}M parameters, LoRA r={cfg.lora.r} trains "
          f"{trainer.num_trainable / 1e6:.2f}M; {trainer.total_steps} steps of {cfg.train.global_batch_size} "
          f"packed rows x {cfg.data.max_length} tokens", flush=True)
    questions = [q for q, _ in QUESTIONS]
    before = answers(trainer.updated_model(), trainer.tokenizer, questions)
    eval_before = trainer.evaluate()["loss"]
    try:
        restored = trainer.open_checkpoints()
        if restored is not None and restored.step >= trainer.total_steps:
            print(f"==> reusing the finished run in {output_dir} (delete it to train again)", flush=True)
            eval_after = trainer.evaluate()["loss"]
        else:
            print(f"==> training (metrics in {output_dir}/metrics.jsonl)", flush=True)
            fit_started = time.perf_counter()
            eval_after = trainer.fit()["eval"]["loss"]
            print(f"==> trained in {time.perf_counter() - fit_started:.0f} s", flush=True)
    finally:
        trainer.close_checkpoints()
    after = answers(trainer.updated_model(), trainer.tokenizer, questions)

    from rich.console import Console

    Console().print(answer_table(questions, before, after, title=(
        f"SmolLM2-135M-Instruct before and after {trainer.total_steps} LoRA steps "
        f"(questions not in the training data; greedy, at most {MAX_NEW_TOKENS} new tokens)")))
    final = output_dir / "final"
    print(f"eval loss of the identity's answers to these questions: {eval_before:.3f} before -> {eval_after:.3f} after")
    for word in (args.name, args.author):
        print(f"answers naming {word!r}: {naming(before, word)}/{len(questions)} before, "
              f"{naming(after, word)}/{len(questions)} after")
    print(f"the fine-tuned model (merged, Hugging Face format) is in {final}")
    print("next:")
    print(f"  sftjax chat {final}")
    print(f"  sftjax export {output_dir} out/identity-gguf --format gguf   # or --format hf / peft")
    print(f"  sftjax eval {CONFIG.relative_to(REPO)} --from {output_dir}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
