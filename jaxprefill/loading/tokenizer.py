"""Tokenizer layer: a `tokenizers.Tokenizer` plus chat template and special ids.

Built either from a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`) or from the
tokenizer metadata llama.cpp stores in a GGUF file, and rendering chat templates the way
transformers' `apply_chat_template` does, without importing transformers.

    tok = Tokenizer.from_gguf(bundled_gguf_path())
    ids = tok.encode_prompt("What is the capital of France?", chat=True)
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from jaxprefill.loading import gguf_reader

__all__ = ["Tokenizer"]

# llama.cpp token types (tokenizer.ggml.token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes for llama.cpp's `tokenizer.ggml.pre` names (those of transformers' GGUF loader).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in splitting digits one by one.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` + chat template + special ids.

    Attributes:
        bos_token_id / pad_token_id: ids, or None when the tokenizer has none.
        eos_token_ids: every id that ends generation (tokenizer eos first, then generation_config / EOT ids).
        vocab_size: tokenizer vocabulary incl. added tokens (may be below the model's embedding rows).
        chat_template: jinja2 source, or None.
        add_bos_token: whether `encode(..., add_special_tokens=True)` prepends BOS.
        backend: the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str | None],
        chat_template: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        """Wrap `backend`; `special_tokens` maps bos_token/eos_token/unk_token/pad_token to strings.

        `add_bos_token` / `add_eos_token`, when given, replace the backend's post-processor with one
        that adds exactly those (GGUF files state them as flags); when None it is kept as is.
        """
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        self.bos_token_id = self._id_of(special_tokens.get("bos_token"))
        self.pad_token_id = self._id_of(special_tokens.get("pad_token"))
        eos = self._id_of(special_tokens.get("eos_token"))
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in (eos, *extra_eos_ids) if i is not None)
        )
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token), eos)
        self.add_bos_token = self.bos_token_id is not None and self.encode("a")[:1] == [self.bos_token_id]
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool, eos_id: int | None) -> None:
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos = add_bos and self.bos_token_id is not None
        add_eos = add_eos and eos_id is not None
        single = f"{bos}:0 " * add_bos + "$A:0" + f" {eos}:0" * add_eos
        pair = single + f" {bos}:1" * add_bos + " $B:1" + f" {eos}:1" * add_eos
        special = [(bos, self.bos_token_id)] * add_bos + [(eos, eos_id)] * add_eos
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer | None:
        """Load `tokenizer.json` (+ tokenizer_config.json, chat_template.jinja, generation_config.json).

        Special tokens and the chat template come from tokenizer_config.json (chat_template.jinja wins);
        generation_config.json's eos_token_id (int or list) extends `eos_token_ids`.

        Returns None when the directory has no tokenizer.json (e.g. a weights-only checkpoint).
        """
        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        special = {
            name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = _select_template(config.get("chat_template"))
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 saves the template here
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        # tokenizer.json's post-processor decides BOS/EOS insertion; like transformers >= 5 we ignore
        # tokenizer_config's add_bos_token/add_eos_token when tokenizer.json exists.
        return cls(backend, special_tokens=special, chat_template=template, extra_eos_ids=extra_eos)

    @classmethod
    def from_gguf(cls, reader_or_path: str | os.PathLike | Any) -> Tokenizer:
        """Build the tokenizer described by a GGUF's `tokenizer.*` metadata.

        Args:
            reader_or_path: a path, a `GGUFContents` (reuses its parsed file), a `gguf_reader.GGUFFile`,
                or a `gguf.GGUFReader`.

        Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE) and "llama" (SentencePiece-style BPE).
        """
        reader = _as_reader(reader_or_path)

        def meta(key: str, default: Any = None) -> Any:
            return gguf_reader.field_value(reader, f"tokenizer.{key}", default)

        kind = meta("ggml.model")
        tokens: list[str] = meta("ggml.tokens") or []
        if not tokens:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
        token_types: list[int] = meta("ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, meta("ggml.merges") or [], meta("ggml.pre"))
            add_bos_default = False
        elif kind == "llama":
            prefix = meta("ggml.add_space_prefix")
            backend = _sentencepiece_bpe(tokens, meta("ggml.merges"), meta("ggml.scores"), prefix)
            add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
        else:
            raise NotImplementedError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' (byte-level BPE), 'llama'"
            )

        def token(key: str) -> str | None:
            index = meta(f"ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        special = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        _add_gguf_added_tokens(backend, tokens, token_types, kind, special)
        # llama.cpp also stops on end-of-turn / end-of-message tokens when the file names them.
        extra_eos = [meta(f"ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
        return cls(
            backend,
            special_tokens=special,
            chat_template=meta("chat_template"),
            extra_eos_ids=[i for i in extra_eos if i is not None],
            add_bos_token=meta("ggml.add_bos_token", add_bos_default),
            add_eos_token=meta("ggml.add_eos_token", False),
        )

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (BOS when add_bos_token)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (numpy/jax ints accepted); special tokens dropped unless asked for."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` through the chat template, as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; render the prompt with chat=False")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def render_prompt(self, prompt: str | list[dict], chat: bool) -> str:
        """Prompt text: with `chat`, a string becomes one user message rendered through the template."""
        if not chat:
            if not isinstance(prompt, str):
                raise ValueError("a list of chat messages needs chat=True")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def encode_prompt(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Ids of `render_prompt(prompt, chat)`.

        A rendered chat template already spells out its BOS, so (as transformers does) no special
        tokens are added to it; a raw prompt gets them (BOS when add_bos_token).
        """
        return self.encode(self.render_prompt(prompt, chat), add_special_tokens=not chat)

    def encode_prompts(self, prompts: Sequence[str | list[dict]], chat: bool) -> list[list[int]]:
        """``[encode_prompt(p, chat) for p in prompts]`` through the backend's batch encoder
        (parallel over the machine's cores)."""
        texts = [self.render_prompt(p, chat) for p in prompts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=not chat)]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
            f"pad={self.pad_token_id}, add_bos={self.add_bos_token}, chat_template={self.chat_template is not None})"
        )


# ---------------------------------------------------------------------- GGUF builders


def _as_reader(source: Any) -> Any:
    """Something `gguf_reader.field_value` reads: a parsed file from a path or `GGUFContents`, or as given."""
    if isinstance(source, gguf_reader.GGUFContents):
        return source.reader if source.reader is not None else gguf_reader.open_gguf(source.path)
    if isinstance(source, (str, os.PathLike)):
        return gguf_reader.open_gguf(source)
    return source


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> BackendTokenizer:
    """GPT-2-style byte-level BPE; the split regex follows llama.cpp's `tokenizer.ggml.pre`."""
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Tokens are stored in the byte alphabet; respell any that are not (as transformers does).
    vocab = {
        tok if set(tok) <= letters else "".join(alphabet[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        # SmolLM's own tokenizer.json: digits one by one, then the GPT-2 regex (llama.cpp does the same).
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None, add_space_prefix: bool | None
) -> BackendTokenizer:
    """SentencePiece-style BPE (Llama 1/2, Mistral v0.1): `▁` for spaces, byte fallback `<0xNN>`."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(vocab, scores or [0.0] * len(tokens))
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    prefix = True if add_space_prefix is None else bool(add_space_prefix)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1, right=0)] * prefix)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two known pieces,
    best score first (ties: shorter left piece, then by piece ids), as transformers' `generate_merges`."""
    found = []
    for token, index in vocab.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((left, right, scores[index]) for left, right in splits)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_gguf_added_tokens(
    backend: BackendTokenizer, tokens: list[str], types: list[int], kind: str, special: dict[str, str | None]
) -> None:
    """Register control tokens (and bos/eos/unk/pad) as special, user-defined ones as plain added tokens,
    so both are matched whole in text instead of being split by BPE."""
    letters = set(_byte_alphabet().values()) if kind == "gpt2" else None
    named = {t for t in special.values() if t is not None}
    control = [
        tok
        for tok, kind_id in zip(tokens, types)
        # A byte-level "control" token outside the byte alphabet is a llama.cpp mislabel: skip it.
        if (kind_id == _CONTROL or tok in named) and (letters is None or set(tok) <= letters)
    ]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [tok for tok, kind_id in zip(tokens, types) if kind_id == _USER_DEFINED]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


# ---------------------------------------------------------------------- HF dir helpers


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or serialized AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _select_template(value: Any) -> str | None:
    """A template string, or the "default" entry of a list of named templates."""
    if isinstance(value, list):
        named = {entry["name"]: entry["template"] for entry in value}
        return named.get("default", next(iter(named.values()), None))
    return value


# ---------------------------------------------------------------------- chat templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile in a sandbox: chat templates ship with checkpoints and are untrusted code."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
