"""Tokenizer layer against transformers (the oracle) on the bundled SmolLM2 GGUF and synthetic files."""

from __future__ import annotations

import json
import pathlib
import shutil

import gguf
import jinja2
import numpy as np
import pytest

from jaxprefill.loading.gguf_reader import GGUFContents, GGUFFile, bundled_gguf_path, open_gguf
from jaxprefill.loading.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    " 12345 678.9 -1e10 3,141,592",
    "héllo wörld ünïcode 日本語 中文 ∑∫ 😀🎉 \u200b",
    "def f(x):\n    return x**2  # square\n\n\n\tend\r\n",
    "   leading   and trailing   ",
    "\n\n\n    \t\t  ",
    "I'm sure you'll say DON'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b<file_sep>c<|im_end|>",
    "x" * 40 + " " + "0" * 17,
    "",
]
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour.\nJust one."}],
]


@pytest.fixture(scope="module")
def smol_path() -> pathlib.Path:
    try:
        return bundled_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smol_reader(smol_path) -> GGUFFile:
    return open_gguf(smol_path)


@pytest.fixture(scope="module")
def tok(smol_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smol_reader)


@pytest.fixture(scope="module")
def ref(smol_path):
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def saved_dir(ref, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("smol_tok")
    ref.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- bundled GGUF


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_match_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == tok.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gguf_chat_template_matches_transformers(tok, ref, messages):
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    ref_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.encode_prompt(messages, chat=True) == list(ref_ids)


@pytest.mark.slow
def test_gguf_special_ids(tok, ref):
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, (2,), 2)
    assert tok.bos_token_id == ref.bos_token_id and tok.pad_token_id == ref.pad_token_id
    assert tok.eos_token_ids == (ref.eos_token_id,)
    assert tok.backend.token_to_id("<|im_end|>") == 2 and tok.backend.token_to_id("<|im_start|>") == 1
    assert tok.vocab_size == len(ref) == 49152
    assert tok.add_bos_token is False  # tokenizer.ggml.add_bos_token = false: the template supplies <|im_start|>
    assert tok.chat_template == ref.chat_template


@pytest.mark.slow
def test_render_prompt(tok):
    question = "What is the capital of France?"
    assert tok.render_prompt(question, chat=False) == question
    rendered = tok.render_prompt(question, chat=True)
    assert rendered == tok.apply_chat_template([{"role": "user", "content": question}])
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_prompt(CONVERSATIONS[0], chat=True) == tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="chat=True"):
        tok.render_prompt(CONVERSATIONS[0], chat=False)


def test_encode_prompts_equals_encode_prompt(tok):
    prompts = ["Hello there", [{"role": "user", "content": "What is 2+2?"}],
               "def f(x):\n    return x * 2\n" * 40]
    for chat in (True, False):
        batch = [p for p in prompts if chat or isinstance(p, str)]
        assert tok.encode_prompts(batch, chat=chat) == [tok.encode_prompt(p, chat=chat)
                                                        for p in batch]


@pytest.mark.slow
def test_from_gguf_contents(smol_path, smol_reader, tok):
    # What read_gguf returns; its parsed file is reused.
    contents = GGUFContents(hf_config={}, tensors={}, path=str(smol_path), reader=smol_reader)
    from_contents = Tokenizer.from_gguf(contents)
    assert from_contents.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert from_contents.eos_token_ids == tok.eos_token_ids


# ---------------------------------------------------------------------- HF directories


@pytest.mark.slow
def test_from_hf_dir_matches_transformers(saved_dir, ref, tok):
    mine = Tokenizer.from_hf_dir(saved_dir)
    for text in TEXTS:
        assert mine.encode(text) == ref.encode(text), text
        assert mine.encode(text) == tok.encode(text), text
    for messages in CONVERSATIONS:
        assert mine.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert (mine.bos_token_id, mine.eos_token_ids, mine.pad_token_id, mine.vocab_size) == (1, (2,), 2, 49152)


@pytest.mark.slow
def test_from_hf_dir_bos_post_processor_and_generation_eos(saved_dir, tmp_path):
    """tokenizer.json's post-processor decides BOS (transformers 5 ignores tokenizer_config's add_bos_token
    when tokenizer.json exists); generation_config.json adds eos ids; AddedToken-dict special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    shutil.copytree(saved_dir, tmp_path, dirs_exist_ok=True)
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False  # ignored, as in transformers
    config["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}  # older files' form
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    mine = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:4]:
        assert mine.encode(text) == ref.encode(text), text
        assert mine.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert mine.encode(text)[0] == 0
    assert mine.add_bos_token and mine.bos_token_id == 0
    assert mine.eos_token_ids == (2, 0)


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_hf_dir(tmp_path) is None


# ---------------------------------------------------------------------- synthetic GGUFs


def _write_tokenizer_gguf(path: pathlib.Path, model: str, tokens: list[str], types: list[int], scores=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (writer.add_block_count, 1),
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 8),
        (writer.add_feed_forward_length, 16),
        (writer.add_head_count, 2),
        (writer.add_head_count_kv, 1),
        (writer.add_vocab_size, len(tokens)),
    ]:
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """`tokenizer.ggml.model = llama`: merges rebuilt from scores, byte fallback, BOS added by default."""
    pieces = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "w", "r", "▁h", "ll", "▁he", "▁hell", "he", "lo"]
    pieces += ["▁hello", "▁w", "or", "▁wor", "ld", "▁world", "ab", "abc", "▁a", "ee"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    _write_tokenizer_gguf(tmp_path / "sp.gguf", "llama", tokens, types, scores)
    mine = Tokenizer.from_gguf(tmp_path / "sp.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert mine.add_bos_token and mine.bos_token_id == 1 and mine.eos_token_ids == (2,)
    via_gguf_reader = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "sp.gguf"))  # the gguf package's reader
    for text in ["hello world", " hello  world", "abc ee é\n", "hello</s>", "<s>hello", "", "  "]:
        ids = mine.encode(text)
        assert via_gguf_reader.encode(text) == ids
        assert ids == ref.encode(text), text
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert mine.decode(ids, skip_special_tokens=False) == ref.decode(ids), text


def test_unsupported_tokenizer_model(tmp_path):
    _write_tokenizer_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]", "a"], [2, 3, 3, 1])
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.model='bert'"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")


# ---------------------------------------------------------------------- chat template sandbox


def _template_tokenizer(template: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(models.BPE(vocab={"<s>": 0, "a": 1}, merges=[]))
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "<s>"}, chat_template=template)


def test_chat_template_helpers_and_sandbox():
    tok = _template_tokenizer("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == '<s>{"role": "user", "content": "é<"}'
    failing = _template_tokenizer("{{ raise_exception('system role not supported') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="system role not supported"):
        failing.apply_chat_template([{"role": "system", "content": "x"}])
    escaping = _template_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        escaping.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tok.backend, special_tokens={}).apply_chat_template([])
