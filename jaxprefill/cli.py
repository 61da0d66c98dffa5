"""Command line: `jaxprefill [--debug] <command> ...`.

Each command lives with its feature and registers itself here via `register(subparsers)`, which
adds a subparser whose `func` default runs it (e.g. `jaxprefill generate`, below).

Errors are handled once, in `run_command`:
  * an ordinary mistake (an exception type in USER_ERRORS) prints one `error: ...` line on
    stderr and exits with status 2, as argparse does for a bad flag;
  * anything else is an internal error (a bug, or an environment jaxprefill does not support):
    the full traceback, then one `error: internal error ...` line, exit status 1;
  * Ctrl-C prints `interrupted` and exits with status 130.
`--debug` adds the full traceback to ordinary mistakes and interrupts (same exit status).

USER_ERRORS: InputError / InputTypeError (jaxprefill.validate: a bad argument, prompt or dtype),
ConfigError (a model or run config that cannot be used), WeightError (a missing, mis-shaped,
truncated or damaged weight file), DataError (a training document that cannot be used),
PromptTooLongError, and the OSErrors of a path that cannot be used (not found, a directory
where a file was expected or the reverse, a file where a directory is to be made, no
permission). A plain
ValueError or TypeError is not among them: numpy and JAX raise those for bugs too, and one line
would hide where. Values parsed from the command line by library code that raises plain
ValueError (sparse policy specs, for one) go through `validate.as_input_error`, which names the
flag. Commands may return other statuses of their own (see each command's help).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable

import jaxprefill as jp
from jaxprefill import compile_cache
from jaxprefill.config import ConfigError
from jaxprefill.data.sources import DataError
from jaxprefill.eval.cli import register as register_eval
from jaxprefill.eval.perplexity_cli import register as register_perplexity
from jaxprefill.infer.cli import register as register_infer
from jaxprefill.loading.weights import WeightError
from jaxprefill.sparse import SparseConfig
from jaxprefill.train.cli import register as register_train
from jaxprefill.validate import InputError, as_input_error, check_sampling

USER_ERRORS: tuple[type[Exception], ...] = (
    InputError, ConfigError, WeightError, DataError, jp.PromptTooLongError,
    FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError,
)
EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Parse argv (default: sys.argv[1:]) and run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    compile_cache.enable()  # later runs of the same shapes skip compiling (compile_cache.py)
    return run_command(args.func, args, debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    debug_help = ("print the full traceback of every error (without it an ordinary mistake "
                  "prints one 'error:' line)")
    parser = argparse.ArgumentParser(prog="jaxprefill", description="jaxprefill command line")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    register_generate(sub)
    register_infer(sub)
    register_train(sub)
    register_eval(sub)
    register_perplexity(sub)
    for command in sub.choices.values():  # `jaxprefill infer --debug ...` works too
        # SUPPRESS: a subcommand's default must not reset a --debug given before the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=debug_help)
    return parser


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                debug: bool = False) -> int:
    """func(args) with the error policy of the module docstring; returns the exit status."""
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # noqa: BLE001 - the last resort: report, never swallow
        traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {describe(e)}); this is a bug in "
              f"jaxprefill or an environment it does not support: please report it with the "
              f"traceback above", file=sys.stderr)
        return EXIT_INTERNAL


def describe(e: BaseException) -> str:
    """One line for an exception: an OSError as `path: reason`, other messages with their line
    breaks folded."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def register_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt strings (one batch)")
    gen.add_argument("--model", default="smollm2-135m-instruct",
                     help="bundled model name, HF directory or .gguf file")
    gen.add_argument("--max-new-tokens", type=int, default=64, help=">= 1")
    gen.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help=">= 0; 0 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--no-chat", dest="chat", action="store_false",
                     help="send prompts raw instead of through the chat template")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--sparse", default=None,
                     help="sparse prefill: a policy name (e.g. flexprefill), name:key=value,... "
                          "or a YAML config (configs/sparse/*.yaml); default dense")
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before it loads.
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, cli=True)
    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():  # no request: the chat template alone, or no token at all
            which = "the prompt" if len(args.prompts) == 1 else f"prompt {i + 1}"
            raise InputError(f"{which} is empty: give the text to answer or complete")
    sparse = None
    if args.sparse is not None:
        with as_input_error("--sparse"):
            sparse = SparseConfig.parse(args.sparse)
    t0 = time.perf_counter()
    model, tokenizer = jp.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise InputError(f"--model {args.model} has no tokenizer files; text prompts need one")
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    outs = jp.generate(model, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                       chat=args.chat, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed, stop=args.stop, sparse=sparse)
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
