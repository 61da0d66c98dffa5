"""`jaxprefill train --config <recipe.yaml> [key.sub=value ...]` (registered by jaxprefill.cli)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or continue pretraining a model from a YAML recipe",
        description="Train from a recipe in configs/train/. Rerunning the same command with the "
                    "same output_dir resumes from its latest checkpoint.")
    p.add_argument("--config", required=True, help="training recipe (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. steps=100 optim.lr=1e-3 output_dir=runs/x")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="after training, export an HF-style safetensors directory here (a LoRA "
                        "run: the adapters merged into the base weights)")
    p.add_argument("--export-adapter", metavar="FILE", default=None,
                   help="after training, also write the LoRA adapter to this .safetensors file "
                        "(LoRA runs; they always write <output_dir>/adapter.safetensors)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from jaxprefill.train import TrainConfig, Trainer

    # A ConfigError or a missing / unreadable file: jaxprefill.cli prints it as one line
    cfg = TrainConfig.load(args.config, args.overrides)
    if args.export_adapter and cfg.lora is None:
        print("error: --export-adapter: this recipe has no lora section", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        if result.status in ("finished", "stopped"):  # stopped: time limit
            if args.export:
                print(f"exported to {trainer.export(args.export)}", file=sys.stderr)
            if args.export_adapter:
                path = trainer.export_adapter(args.export_adapter, cfg.checkpoint.export_dtype)
                print(f"adapter written to {path}", file=sys.stderr)
    finally:
        trainer.close()
    last = result.last
    summary = f"{result.status} at step {result.step}"
    if "loss" in last:
        summary += f": loss {last['loss']:.4f}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f}"
    print(summary, file=sys.stderr)
    return 0 if result.status in ("finished", "stopped") else 3
