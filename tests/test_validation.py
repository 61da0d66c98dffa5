"""Input validation (jaxprefill/validate.py) through the Python API: jp.generate, the engine's
requests and jp.load reject bad values with one message naming the field and the allowed range."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
import jaxprefill.loading as loading
from jaxprefill.infer import Engine, EngineConfig, Request
from jaxprefill.validate import (InputError, InputTypeError, check_backend_dtype, check_id,
                                 check_prompt)
from test_loading_errors import write_checkpoint

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    cfg = jp.ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=128, eos_token_ids=(0,))
    return jp.Llama(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, None, EngineConfig(max_batch=2, prefill_tokens=64, page_size=16,
                                            num_pages=8, bucket=64, max_new_tokens=4, chat=False))


BAD_SAMPLING = [  # (kwargs, message, is a TypeError)
    ({"temperature": -0.5}, r"temperature must be a number >= 0 \(0 = greedy\), got -0\.5", False),
    ({"temperature": math.nan}, r"temperature must be a number >= 0", False),
    ({"temperature": "hot"}, r"temperature must be a number >= 0.*got 'hot'", True),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0\.0", False),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1\.5", False),
    ({"top_k": -1}, r"top_k must be an integer in \[0, 2147483647\] \(0 = off\), got -1", False),
    ({"top_k": 2.0}, r"top_k must be an integer", True),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0", False),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 1, got 2\.5", True),
    ({"seed": 1.5}, r"seed must be an integer in \[-2147483648, 2147483647\], got 1\.5", True),
    ({"seed": 2**40}, r"seed must be an integer in \[-2147483648, 2147483647\]", False),
    ({"seed": True}, r"seed must be an integer", True),
    ({"stop": "###"}, r"stop must be a list of strings, got the bare string '###'; wrap it in a "
                      r"list: \['###'\]", True),
    ({"stop": ["a", 3]}, r"stop must be a list of strings", True),
    ({"stop": [""]}, r"stop must be a list of non-empty strings", False),
]


@pytest.mark.parametrize("kwargs,message,is_type", BAD_SAMPLING)
def test_generate_rejects_bad_sampling(model, kwargs, message, is_type):
    with pytest.raises(InputError, match=f"^{message}") as e:
        jp.generate(model, None, [[1, 2, 3]], **kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError) == is_type


BAD_PROMPTS = [  # (prompts, message, is a TypeError)
    ("Hello", r"prompts must be a list of prompts, got a bare string 'Hello'; wrap it in a list: "
              r"\['Hello'\]", True),
    ([], r"prompts is an empty list: give at least one prompt", False),
    ({"a": [1]}, r"prompts must be a list .*got dict", True),
    (np.ones((2, 3), np.float32), r"prompts as an array must be 2-D integer token ids", True),
    ([[1, VOCAB]], rf"prompt 0: token id 1 is {VOCAB}, outside the vocabulary \[0, {VOCAB}\)",
     False),
    ([[5], [-1, 2]], rf"prompt 1: token id 0 is -1, outside the vocabulary \[0, {VOCAB}\)", False),
    ([[1, 2.5]], r"prompt 0: token id 1 must be an integer, got float 2\.5", True),
    ([[True, 1]], r"prompt 0: a prompt must be a string, a list of chat messages .*got a list "
                  r"starting with bool True", True),
    ([[1], []], r"prompt 1: empty prompt", False),
    ([7], r"prompt 0: a prompt must be a string, .*got int 7", True),
    ([None], r"prompt 0: a prompt must be .*got NoneType None", True),
    ([[{"role": "user", "content": "hi"}, {"role": "user"}]],
     r"prompt 0: chat message 1 must be a dict with string 'role' and 'content'", True),
]


@pytest.mark.parametrize("prompts,message,is_type", BAD_PROMPTS)
def test_generate_rejects_bad_prompts(model, prompts, message, is_type):
    with pytest.raises(InputError, match=f"^{message}") as e:
        jp.generate(model, None, prompts, max_new_tokens=2)
    assert isinstance(e.value, TypeError) == is_type


class WordTokenizer:
    """Whitespace words -> ids; the empty string has no token (no chat template)."""

    eos_token_ids = (0,)

    def encode_prompt(self, prompt, chat=True):
        return [len(w) % (VOCAB - 1) + 1 for w in prompt.split()]


def test_a_prompt_without_tokens_is_an_input_error(model, engine):
    """Was a plain ValueError: the command line showed a traceback for `generate --no-chat ''`."""
    with pytest.raises(InputError, match=r"^prompt 1 is empty after tokenization"):
        jp.generate(model, WordTokenizer(), ["a b", ""], max_new_tokens=2, chat=False)
    words = Engine(model, WordTokenizer(), engine.config)
    with pytest.raises(InputError, match=r"^request 'e': empty prompt after tokenization"):
        words.prepare(Request(id="e", prompt=" "))


def test_generate_accepts_numpy_prompts_and_settings(model):
    """Numpy integer rows and numpy scalar settings are valid and mean the same as Python ones."""
    kw = dict(max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, seed=3)
    ref = jp.generate(model, None, [[1, 2, 3], [4, 5, 6]], **kw)
    out = jp.generate(model, None, np.array([[1, 2, 3], [4, 5, 6]], np.int64),
                      max_new_tokens=np.int64(3), temperature=np.float32(0.7), top_p=0.9,
                      top_k=np.int32(5), seed=np.int64(3))
    assert [r.tokens for r in out] == [r.tokens for r in ref]
    assert all(1 <= len(r.tokens) <= 3 or r.finish_reason == "eos" for r in out)


@pytest.mark.parametrize("rid", [1.5, None, [1], True])
def test_request_id_must_be_str_or_int(engine, rid):
    with pytest.raises(InputTypeError, match=f"^request id must be a string or an integer, got "
                                             f"{type(rid).__name__} "):
        engine.prepare(Request(id=rid, prompt=[1, 2]))


def test_request_ids_str_and_int_are_admitted(engine):
    assert engine.prepare(Request(id=7, prompt=[1, 2])).ids.tolist() == [1, 2]
    assert engine.prepare(Request(id="a", prompt=np.array([3, 4]))).ids.tolist() == [3, 4]
    check_id("x")
    check_id(np.int64(3), "job id")
    with pytest.raises(InputTypeError, match="^job id must be a string or an integer, got float"):
        check_id(1.5, "job id")


@pytest.mark.parametrize("fields,message", [
    ({"temperature": -1.0}, r"request 'r': temperature must be a number >= 0"),
    ({"top_p": 2.0}, r"request 'r': top_p must be a number in \(0, 1\]"),
    ({"top_k": -3}, r"request 'r': top_k must be an integer in \[0, 2147483647\]"),
    ({"max_new_tokens": 0}, r"request 'r': max_new_tokens must be an integer >= 1, got 0"),
    ({"seed": "7"}, r"request 'r': seed must be an integer"),
    ({"stop": "\n"}, r"request 'r': stop must be a list of strings, got the bare string"),
    ({"prompt": [1, 500]},
     rf"request 'r': token id 1 is 500, outside the vocabulary \[0, {VOCAB}\)"),
    ({"prompt": []}, r"request 'r': empty prompt"),
    ({"prompt": None}, r"request 'r': a prompt must be a string, .*got NoneType"),
])
def test_engine_requests_are_validated(engine, fields, message):
    req = Request(id="r", **{"prompt": [1, 2, 3], **fields})
    with pytest.raises(InputError, match=f"^{message}"):
        engine.prepare(req)


def test_invalid_requests_go_to_on_error(engine):
    """An InputTypeError is a ValueError: Engine.run reports it per request, the run goes on."""
    errors, done = [], []
    engine.run([Request(id=1.5, prompt=[1]), Request(id="t", prompt=[1], top_k=-1)], done.append,
               on_error=lambda r, e: errors.append((r.id, type(e).__name__)))
    assert errors == [(1.5, "InputTypeError"), ("t", "InputError")] and done == []


def test_engine_generate_rejects_a_bare_string(engine):
    with pytest.raises(TypeError, match="wrap it in a list"):
        engine.generate("Hello")


def test_engine_config_sampling_defaults_are_checked(model):
    with pytest.raises(InputError, match=r"^engine config: top_k must be an integer in \[0, "):
        Engine(model, None, EngineConfig(top_k=-1, num_pages=4))
    with pytest.raises(InputError, match=r"^engine config: seed must be an integer"):
        Engine(model, None, EngineConfig(seed=0.5, num_pages=4))


def test_check_backend_dtype():
    check_backend_dtype(jnp.float16, "gpu")
    check_backend_dtype(jnp.bfloat16, "cpu")
    with pytest.raises(InputError, match=r"^dtype='float16' cannot run on the CPU backend .*on the "
                                         r"CPU use dtype='float32' or 'bfloat16'"):
        check_backend_dtype(jnp.float16, "cpu")


def test_load_rejects_dtypes_up_front(tmp_path, monkeypatch):
    """float16 compute fails deep inside XLA on the CPU: jp.load says so before loading."""
    monkeypatch.setattr(loading.jax, "default_backend", lambda: "cpu")
    ckpt = write_checkpoint(tmp_path / "m")
    with pytest.raises(InputError, match=r"^dtype='float16' cannot run on the CPU backend"):
        jp.load(ckpt, dtype="float16")
    with pytest.raises(InputError, match=r"^dtype='float16' cannot run"):
        jp.load(ckpt, dtype=jnp.float16)
    with pytest.raises(InputError, match=r"^unknown dtype 'fp16'; choose one of \['float32', "
                                         r"'bfloat16', 'float16'\]"):
        jp.load(ckpt, dtype="fp16")
    with pytest.raises(InputTypeError, match=r"^param_dtype must be one of .*got <class"):
        jp.load(ckpt, param_dtype=jnp.int8)
    with pytest.raises(InputError, match=r"^attention: unknown attention impl 'nope'"):
        jp.load(ckpt, attention="nope")
    # float16 storage with float32 compute runs on the CPU
    model, _ = jp.load(ckpt, dtype="float32", param_dtype="float16")
    assert np.isfinite(np.asarray(model(np.arange(4, dtype=np.int32)[None]))).all()


@pytest.mark.parametrize("ids, message", [
    ([1, 2, True, 4], "token id 2 must be an integer, got bool"),
    ([1, np.bool_(False)], "token id 1 must be an integer, got bool"),
    ([5, 2.0, 3], "token id 1 must be an integer, got float"),
    ([1, 7, -5, 3], "token id 2 is -5, outside the vocabulary"),
    ([1, 2, 100], "token id 2 is 100, outside the vocabulary \\[0, 100\\)"),
    ([1, 2**70], "token id 1 is 1180591620717411303424, outside"),
    ([np.int64(3), 4, "a"], "token id 2 must be an integer, got str"),
])
def test_check_prompt_names_the_first_bad_token_id(ids, message):
    """The vectorized path for integer lists and the per-entry loop agree on what is refused."""
    with pytest.raises(InputError, match=message):
        check_prompt(ids, vocab_size=100)


def test_check_prompt_returns_python_ints_for_long_prompts():
    ids = np.random.default_rng(0).integers(0, 100, 40_000)
    for given in (ids.tolist(), ids, tuple(ids.tolist()), [np.int32(t) for t in ids[:50]]):
        out = check_prompt(given, vocab_size=100)
        assert out == [int(t) for t in given] and all(type(t) is int for t in out)
