"""The model-source arguments of the benchmarks that run a real model's prompt."""

from __future__ import annotations

import argparse


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--model / --gguf (one of them; neither: the script's random model), --adapter, --task."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a bundled model name or a model path (real weights)")
    src.add_argument("--gguf", help="a .gguf file (real weights)")
    p.add_argument("--adapter", help="an adapter over --model / --gguf (jp.load's adapter=: a "
                   ".safetensors file or a training run's output_dir)")
    p.add_argument("--task", default="passkey", help="jaxprefill eval task of a real prompt")
