"""Command line: `jaxprefill <command> ...`.

Each command lives with its feature and registers itself here via `register(subparsers)`, which
adds a subparser whose `func` default runs it (e.g. `jaxprefill generate`, below).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxprefill", description="jaxprefill command line")
    sub = parser.add_subparsers(dest="command", required=True)
    register_generate(sub)
    from jaxprefill.infer.cli import register as register_infer
    from jaxprefill.train.cli import register as register_train

    register_infer(sub)
    register_train(sub)
    from jaxprefill.eval.cli import register as register_eval

    register_eval(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def register_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt strings (one batch)")
    gen.add_argument("--model", default="smollm2-135m-instruct",
                     help="bundled model name, HF directory or .gguf file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--no-chat", dest="chat", action="store_false",
                     help="send prompts raw instead of through the chat template")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--sparse", default=None,
                     help="sparse prefill: a policy name (e.g. flexprefill) or a YAML config "
                          "(configs/sparse/*.yaml); default dense")
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import jaxprefill as jp  # after arg parsing so --help is instant

    t0 = time.perf_counter()
    model, tokenizer = jp.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer files; text prompts need one", file=sys.stderr)
        return 2
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        outs = jp.generate(model, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                           chat=args.chat, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed, stop=args.stop, sparse=args.sparse)
    except jp.PromptTooLongError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text)
    s = outs.stats
    print(f"prefill {s.prompt_tokens} tok in {s.prefill_s:.2f}s, decode {s.generated_tokens} tok "
          f"in {s.decode_s:.2f}s ({s.decode_tok_s:.1f} tok/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
