"""The instructor path users with a network take (``hkunlp/instructor-*``): instruction plus text, the
instruction left out of mean pooling. A tiny random T5 encoder is saved here in instructor models'
folder layout (T5 encoder, mean pooling, bias-free dense layer, normalisation; a SentencePiece-style
tokenizer ending every text with ``</s>``), then checked against pooling computed by hand and used
for a registry fit and routing decisions (real Redis)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo_pool"
TASKS = ("uppercase", "iso_to_us_date", "list_max", "number_to_words")
DIM = 32


def _demo() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    manifest = {e["model_name"]: e for e in json.loads((DEMO / "manifest.json").read_text())}
    samples = {t: [s["inputs"] for s in manifest[t]["sample"]] for t in TASKS}
    tests = {t: [json.loads(line)["inputs"] for line in (DEMO / "data" / t / "test.jsonl").read_text().splitlines()[:6]]
             for t in TASKS}
    return samples, tests


def build_tiny_instructor(folder: Path, corpus: list[str]) -> Path:
    """A random 2-layer T5 encoder (d_model 32) saved as an instructor-format sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    spm = SentencePieceUnigramTokenizer()
    spm.train_from_iterator(corpus, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    spm.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", spm.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    encoder_dir = folder / "t5"
    T5EncoderModel(cfg).save_pretrained(encoder_dir)
    tok.save_pretrained(encoder_dir)
    st = SentenceTransformer(modules=[
        models.Transformer(str(encoder_dir)), models.Pooling(DIM, "mean"),
        models.Dense(DIM, DIM, bias=False, activation_function=torch.nn.Identity()), models.Normalize()])
    out = folder / "tiny-instructor"
    st.save(str(out))
    return out


@pytest.fixture(scope="module")
def instructor(tmp_path_factory) -> tuple[Path, SentenceEmbedder]:
    samples, tests = _demo()
    corpus = [DEFAULT_INSTRUCTION] + [t for v in samples.values() for t in v] + [t for v in tests.values() for t in v]
    folder = build_tiny_instructor(tmp_path_factory.mktemp("instructor"), corpus)
    return folder, SentenceEmbedder(str(folder))


def _by_hand(folder: Path, instruction: str, text: str, skip_instruction: bool) -> np.ndarray:
    """Instructor pooling from the encoder's token states: mean over the text's tokens (and the closing
    ``</s>``), the instruction's tokens left out; then the dense layer and L2 normalisation."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(folder)
    enc = T5EncoderModel.from_pretrained(folder).eval()
    dense = next(v for k, v in load_file(str(folder / "2_Dense" / "model.safetensors")).items() if "weight" in k)
    n_instruction = len(tok(instruction)["input_ids"]) - 1  # without its own closing </s>
    ids = tok(instruction + text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = enc(input_ids=ids).last_hidden_state[0]
    start = n_instruction if skip_instruction else 0
    v = h[start:].mean(dim=0) @ dense.T
    return (v / v.norm()).numpy()


def test_the_instruction_is_left_out_of_pooling(instructor):
    folder, emb = instructor
    assert emb.instructor and not emb.identity.instruction_in_pooling
    assert emb.identity.name == str(folder) and emb.dim == DIM
    texts = ["Write this in uppercase: lunar ember", "Which is the largest: 4, 19, 7?"]
    got = emb.encode(texts)  # a padded batch of two lengths
    for i, text in enumerate(texts):
        want = _by_hand(folder, DEFAULT_INSTRUCTION, text, skip_instruction=True)
        np.testing.assert_allclose(got[i], want, atol=2e-5)
        with_instruction = _by_hand(folder, DEFAULT_INSTRUCTION, text, skip_instruction=False)
        assert np.abs(got[i] - with_instruction).max() > 1e-2  # the check can tell the two apart
    # the same model named as a plain encoder pools over the instruction too
    plain = SentenceEmbedder(str(folder), instructor=False)
    np.testing.assert_allclose(plain.encode(texts[:1])[0],
                               _by_hand(folder, DEFAULT_INSTRUCTION, texts[0], skip_instruction=False), atol=2e-5)


def test_registry_fit_and_routing_with_the_instructor_embedder(instructor, redis_url):
    from registry import AdmissionSettings, Registry, RegistryConfig, StoreSettings

    folder, emb = instructor
    samples, tests = _demo()
    prefix = "instr-" + hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    cfg = RegistryConfig(store=StoreSettings(redis_url=redis_url, key_prefix=prefix, channel=f"{prefix}:events"),
                         admission=AdmissionSettings(hub_lookup=False))
    reg = Registry(cfg, embedder=emb)
    for t in TASKS:
        reg.register(t, str(DEMO / "adapters" / t), samples[t])
    stored = reg.get_with_embeddings(TASKS[0])
    assert stored.embeddings.shape == (len(samples[TASKS[0]]), DIM)
    texts = [t for task in TASKS for t in tests[task]]
    decisions = reg.route(texts)
    top = [d.plan.adapters[0] if d.plan.adapters else None for d in decisions]
    want = [task for task in TASKS for _ in tests[task]]
    hits = sum(a == b for a, b in zip(top, want, strict=True))
    assert hits >= 0.9 * len(want), list(zip(top, want, strict=True))
    assert reg.store.get_parameters().epoch == reg.epoch()
    reg.close()
