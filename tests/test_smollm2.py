"""The bundled real model (SmolLM2-135M-Instruct, GGUF Q4_1) end to end on the CPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import jaxprefill as jp
from jaxprefill.loading.gguf_reader import bundled_gguf_path

pytestmark = pytest.mark.slow

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@pytest.fixture(scope="module")
def smol():
    return jp.load("smollm2-135m-instruct")


def test_logits_match_transformers_from_same_gguf(smol):
    model, tokenizer = smol
    path = bundled_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    text = ("Long-context prefill is the phase where a language model reads the whole prompt "
            "before it writes the first token. ") * 5
    ids = tokenizer.encode(text)[:100]
    assert len(ids) == 100
    ours = np.asarray(model(np.asarray([ids], np.int32)))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < 1e-3, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_chat_answer_paris(smol):
    model, tokenizer = smol
    out = jp.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=24,
                      chat=True, temperature=0.0)[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason == "eos"


def test_passkey_in_2k_tokens(smol):
    model, tokenizer = smol
    passkey = "71432"
    half = FILLER * 40
    prompt = (f"There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
              f"it.\n{half}\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
              f"{half}\nWhat is the pass key?")
    out = jp.generate(model, tokenizer, [prompt], max_new_tokens=16, chat=True)[0]
    assert 1800 <= out.prompt_tokens <= 2600, out.prompt_tokens
    assert passkey in out.text, out.text


def test_batched_equals_alone(smol):
    model, tokenizer = smol
    rng = np.random.default_rng(0)
    words = FILLER.split()
    prompts = []
    for n in (5, 40, 150, 300):  # target token counts
        ids = tokenizer.encode(" ".join(rng.choice(words, size=n)), add_special_tokens=False)[:n]
        prompts.append(ids)
    assert [len(p) for p in prompts] == [5, 40, 150, 300]
    batched = jp.generate(model, tokenizer, prompts, max_new_tokens=12)
    for p, b in zip(prompts, batched):
        alone = jp.generate(model, tokenizer, [p], max_new_tokens=12)[0]
        assert b.tokens == alone.tokens
        assert len(b.tokens) > 0


def test_sampling_is_seeded_and_stop_strings(smol):
    model, tokenizer = smol
    kw = dict(max_new_tokens=10, chat=True, temperature=0.8, top_p=0.9, top_k=50)
    a = jp.generate(model, tokenizer, ["Tell me a story."], seed=1, **kw)[0]
    b = jp.generate(model, tokenizer, ["Tell me a story.", "Hi"], seed=1, **kw)[0]
    assert a.tokens == b.tokens
    out = jp.generate(model, tokenizer, ["Count from 1 to 10, separated by commas."],
                      max_new_tokens=40, chat=True, stop=["5"])[0]
    assert out.finish_reason == "stop" and "5" not in out.text and "4" in out.text, out.text


def test_prompt_longer_than_context(smol):
    model, tokenizer = smol
    too_long = list(range(100, 100 + model.config.max_position_embeddings))
    with pytest.raises(jp.PromptTooLongError, match=r"prompt 1 has 8192 tokens.*context is 8192"):
        jp.generate(model, tokenizer, [[1, 2, 3], too_long], max_new_tokens=4)


def test_cli_generate():
    proc = subprocess.run([sys.executable, "-m", "jaxprefill.cli", "generate", "--max-new-tokens",
                           "12", "What is the capital of France?"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
