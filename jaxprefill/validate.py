"""Checks of user input shared by `jp.generate`, the batch engine, `jp.load` and the command line.

Every check raises with one line that names the field and what is allowed:

    InputError      (a ValueError): a value out of range, an empty prompt, a dtype the backend
                    cannot run.
    InputTypeError  (an InputError and a TypeError): a value of the wrong type, such as a bare
                    string where a list of prompts is expected.

Both mean "the caller made a mistake": `jaxprefill` commands print them as one `error:` line and
exit with status 2 (jaxprefill/cli.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Set
from typing import Any

import numpy as np

INT32_MAX = 2**31 - 1
# Compute dtypes XLA's CPU backend runs: its dot has no float16 kernel ("F16_F16_F32").
CPU_DTYPES = ("float32", "bfloat16")


class InputError(ValueError):
    """A user-supplied value that cannot be used; the message names the field and the range."""


class InputTypeError(InputError, TypeError):
    """A user-supplied value of the wrong type; the message names the field and the types."""


@contextlib.contextmanager
def as_input_error(what: str) -> Iterator[None]:
    """Re-raise ValueError / TypeError from parsing one user-given value as an InputError that
    names it (e.g. `what="--sparse"`), so the command line reports a mistake, not a crash."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError) as e:
        raise InputError(f"{what}: {e}") from e


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    return is_int(v) or isinstance(v, (float, np.floating))


def _show(v: Any) -> str:
    """A value for an error message: its repr, with the type when the type is the problem."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_id(value: Any, field: str = "id") -> None:
    """A request or job id: a str or an int (not a bool, float, list or None)."""
    if not (isinstance(value, str) or is_int(value)):
        raise InputTypeError(f"{field} must be a string or an integer, got "
                             f"{type(value).__name__} {_show(value)}")


def check_sampling(*, max_new_tokens: Any = None, temperature: Any = None, top_p: Any = None,
                   top_k: Any = None, seed: Any = None, stop: Any = None, where: str = "",
                   cli: bool = False) -> None:
    """Check the generation settings that are given (None = not given, not checked).

    Allowed: max_new_tokens an int >= 1; temperature a finite number >= 0 (0 = greedy); top_p a
    number in (0, 1]; top_k an int in [0, 2**31) (0 = off); seed an int in [-2**31, 2**31);
    stop a list of non-empty strings. `where` prefixes the message ("request 'a'"); `cli` names
    fields as command-line flags (`--max-new-tokens`).
    """
    def fail(field: str, allowed: str, value: Any, kind: type[InputError] = InputError):
        name = "--" + field.replace("_", "-") if cli else field
        prefix = f"{where}: " if where else ""
        raise kind(f"{prefix}{name} must be {allowed}, got {_show(value)}")

    if max_new_tokens is not None:
        if not is_int(max_new_tokens):
            fail("max_new_tokens", "an integer >= 1", max_new_tokens, InputTypeError)
        if max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1", max_new_tokens)
    if temperature is not None:
        if not is_number(temperature):
            fail("temperature", "a number >= 0 (0 = greedy)", temperature, InputTypeError)
        if not (math.isfinite(temperature) and temperature >= 0):
            fail("temperature", "a number >= 0 (0 = greedy)", temperature)
    if top_p is not None:
        if not is_number(top_p):
            fail("top_p", "a number in (0, 1]", top_p, InputTypeError)
        if not 0 < top_p <= 1:
            fail("top_p", "a number in (0, 1]", top_p)
    if top_k is not None:
        if not is_int(top_k):
            fail("top_k", f"an integer in [0, {INT32_MAX}] (0 = off)", top_k, InputTypeError)
        if not 0 <= top_k <= INT32_MAX:
            fail("top_k", f"an integer in [0, {INT32_MAX}] (0 = off)", top_k)
    if seed is not None:
        allowed = f"an integer in [{-INT32_MAX - 1}, {INT32_MAX}]"
        if not is_int(seed):
            fail("seed", allowed, seed, InputTypeError)
        if not -INT32_MAX - 1 <= seed <= INT32_MAX:
            fail("seed", allowed, seed)
    if stop is not None:
        if isinstance(stop, str):
            name = "--stop" if cli else "stop"
            prefix = f"{where}: " if where else ""
            raise InputTypeError(f"{prefix}{name} must be a list of strings, got the bare string "
                                 f"{_show(stop)}; wrap it in a list: [{_show(stop)}]")
        if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            fail("stop", "a list of strings", stop, InputTypeError)
        if any(not s for s in stop):
            fail("stop", "a list of non-empty strings", stop)


def check_prompt_list(prompts: Any, *, allow_empty: bool = False) -> list:
    """The container of a batch of prompts as a list: a list, tuple or other ordered iterable (a
    2-D integer array counts as a list of token id rows). A bare string is a TypeError that says
    to wrap it in a list; mappings and sets (no order to return results in) are TypeErrors."""
    if isinstance(prompts, (str, bytes)):
        raise InputTypeError(f"prompts must be a list of prompts, got a bare string "
                             f"{_show(prompts)}; wrap it in a list: [{_show(prompts)}]")
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise InputTypeError(f"prompts as an array must be 2-D integer token ids [batch, "
                                 f"length], got shape {prompts.shape} dtype {prompts.dtype}")
        prompts = list(prompts)
    if isinstance(prompts, (Mapping, Set)) or not isinstance(prompts, Iterable):
        raise InputTypeError(f"prompts must be a list (of strings, chat message lists or token "
                             f"id lists), got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts and not allow_empty:
        raise InputError("prompts is an empty list: give at least one prompt")
    return prompts


def check_prompt(prompt: Any, where: str = "prompt", vocab_size: int | None = None):
    """One prompt: a str, a non-empty list of chat messages ({"role": str, "content": str}
    dicts), or a non-empty list (or 1-D integer array) of token ids, each an int in
    [0, vocab_size). `where` starts the message ("prompt 3", "request 'a'"). Returns the prompt
    with token ids as a list of Python ints."""
    if isinstance(prompt, str):
        return prompt
    kinds = ("a prompt must be a string, a list of chat messages ({'role': ..., 'content': ...} "
             "dicts) or a list of token ids (ints)")
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise InputTypeError(f"{where}: a prompt array must be 1-D integer token ids, got "
                                 f"shape {prompt.shape} dtype {prompt.dtype}")
        if not prompt.size:
            raise InputError(f"{where}: empty prompt; give a string, chat messages or token ids")
        return _checked_ids(prompt, where, vocab_size)
    if not isinstance(prompt, (list, tuple)):
        raise InputTypeError(f"{where}: {kinds}, got {type(prompt).__name__} {_show(prompt)}")
    if not prompt:
        raise InputError(f"{where}: empty prompt; give a string, chat messages or token ids")
    if isinstance(prompt[0], dict):
        for j, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise InputTypeError(f"{where}: chat message {j} must be a dict with string "
                                     f"'role' and 'content', got {_show(m)}")
        return list(prompt)
    if not is_number(prompt[0]):
        raise InputTypeError(f"{where}: {kinds}, got a list starting with "
                             f"{type(prompt[0]).__name__} {_show(prompt[0])}")
    ids = _integer_array(prompt)
    if ids is not None:  # all integers: one vectorized range check (a 32K prompt: ~2 ms, not 40)
        return _checked_ids(ids, where, vocab_size)
    for j, t in enumerate(prompt):
        if not is_int(t):
            raise InputTypeError(f"{where}: token id {j} must be an integer, got "
                                 f"{type(t).__name__} {_show(t)}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InputError(f"{where}: token id {j} is {int(t)}, outside the vocabulary "
                             f"{allowed}")
    return [int(t) for t in prompt]


def _checked_ids(ids: np.ndarray, where: str, vocab_size: int | None) -> list[int]:
    """1-D integer token ids -> a list of Python ints, or InputError naming the first id
    outside [0, vocab_size)."""
    bad = (ids < 0) if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    if bad.any():
        j = int(np.argmax(bad))
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InputError(f"{where}: token id {j} is {int(ids[j])}, outside the vocabulary "
                         f"{allowed}")
    return ids.tolist()


def _integer_array(ids: Any) -> np.ndarray | None:
    """ids as a 1-D integer array when every entry is an int (no bools, floats or other
    types: those go through the per-entry loop, which names the entry); else None."""
    if any(issubclass(t, (bool, np.bool_)) for t in set(map(type, ids))):
        return None  # numpy would read True as 1
    try:
        arr = np.asarray(ids)
    except (ValueError, OverflowError, TypeError):
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return None
    return arr


def check_prompts(prompts: Any, vocab_size: int | None = None) -> list:
    """`check_prompt_list` then `check_prompt` for each ("prompt i"); returns the checked list."""
    return [check_prompt(p, f"prompt {i}", vocab_size)
            for i, p in enumerate(check_prompt_list(prompts))]


def check_backend_dtype(dtype: Any, platform: str, field: str = "dtype") -> None:
    """A compute dtype the backend runs: XLA's CPU backend runs float32 and bfloat16 only."""
    name = np.dtype(dtype).name
    if platform == "cpu" and name not in CPU_DTYPES:
        raise InputError(f"{field}={name!r} cannot run on the CPU backend (XLA's CPU matrix "
                         f"multiply has no {name} kernel); on the CPU use {field}="
                         f"{' or '.join(repr(d) for d in CPU_DTYPES)} (param_dtype={name!r} "
                         f"still stores the weights in {name})")
