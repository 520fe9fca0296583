"""Opt-in checks on the real SmolLM2-135M-Instruct weights (the embedded GGUF): `pytest -m slow`.

Perplexity is exp(mean next-token NLL). A correctly loaded model finds natural English easy (< 10)
and the same words in random order much harder; a wrong RoPE layout or a bad dequantisation
breaks the first or shrinks the gap.
"""

import math
import random

import pytest
import torch

pytestmark = pytest.mark.slow

PARAGRAPH = (  # encyclopedic prose; a quirkier paragraph about library hours scores 14.6 (transformers agrees)
    "The Earth is the third planet from the Sun and the only astronomical object known to harbor life. "
    "About 71 percent of its surface is covered with water, mostly by oceans. The remaining 29 percent is "
    "land, which is made up of continents and islands. The Earth's atmosphere consists mostly of nitrogen "
    "and oxygen, and it protects life on the surface from harmful radiation."
)


def perplexity(model, enc, text):
    idx = torch.tensor([enc.encode(text)])
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    return math.exp(loss.item())


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from loading.pretrained import load_pretrained
    try:
        return load_pretrained("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_perplexity_natural_vs_shuffled(smollm2):
    model, enc = smollm2
    words = PARAGRAPH.split()
    random.Random(0).shuffle(words)
    natural, shuffled = perplexity(model, enc, PARAGRAPH), perplexity(model, enc, " ".join(words))
    print(f"SmolLM2-135M perplexity: natural {natural:.2f}, shuffled {shuffled:.2f}")
    assert natural < 10
    assert shuffled > 5 * natural


def test_smollm2_answers_a_chat_question(smollm2):
    from loading.tokenizer import chat_prompt
    model, enc = smollm2
    idx = torch.tensor([enc.encode(chat_prompt(enc, "What is the capital of France?"), allowed_special="all")])
    tokens = [t.item() for t, _ in model.generate(idx, 8, temperature=0)]
    assert "Paris" in enc.decode(tokens)


def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
    """An independent reading of the same GGUF: transformers dequantises and un-permutes it itself."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    import os
    from loading.gguf_file import smollm2_gguf_path
    path = smollm2_gguf_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    model, enc = smollm2
    idx = torch.tensor([enc.encode(PARAGRAPH)])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], theirs(idx).logits, atol=2e-4, rtol=1e-4)
