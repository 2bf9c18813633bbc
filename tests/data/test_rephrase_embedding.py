"""The embedding fidelity check's embedders: WordLlama's shipped static embeddings, a model2vec-layout directory,
the spec errors, and `openk2 rephrase --checks embedding` through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from openk2.data.rephrase.embedding import HashingEmbedder, StaticEmbedder, cosine, load_embedder
from openk2.data.world import World, world_documents
from openk2.serve.testing import toy_tokenizer

SOURCE = "Ada Vell was born in Trevane in 1990 and studied chemistry at the University of Kosk."
PARAPHRASE = "Born in 1990 in Trevane, Ada Vell went on to study chemistry at Kosk's university."
UNRELATED = "The harbour freezes every winter, so the ferries stop running until the spring thaw."


def test_wordllama_embeds_offline_and_ranks_a_paraphrase_above_an_unrelated_text():
    e = load_embedder("wordllama")
    assert isinstance(e, StaticEmbedder) and e.name == "wordllama-l2-supercat-256"
    src_D, para_D, other_D = e.embed([SOURCE, PARAPHRASE, UNRELATED])
    assert len(src_D) == 256 and abs(cosine(src_D, src_D) - 1.0) < 1e-5
    assert cosine(src_D, para_D) > cosine(src_D, other_D) + 0.2


def test_static_directory_is_the_mean_of_token_embeddings(tmp_path):
    tok = toy_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str())
    rng = np.random.default_rng(0)
    matrix_VD = rng.standard_normal((tok.vocab_size, 8)).astype(np.float32)
    save_file({"embeddings": matrix_VD}, str(tmp_path / "model.safetensors"))
    e = load_embedder(str(tmp_path))
    (got_D,) = e.embed(["the weather in Paris"])
    ids = tok.backend.encode("the weather in Paris", add_special_tokens=False).ids
    want_D = matrix_VD[ids].mean(axis=0)
    np.testing.assert_allclose(got_D, want_D / np.linalg.norm(want_D), rtol=1e-5)
    assert isinstance(load_embedder("hashing"), HashingEmbedder)


def test_bad_embedder_specs_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="expected 'wordllama', 'hashing', or a local model directory"):
        load_embedder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs tokenizer.json and one .safetensors"):
        load_embedder(str(tmp_path))


def test_cli_embedding_check_rejects_below_the_threshold(tmp_path):
    docs = world_documents(World.generate(seed=3, n_people=20), renderings_per_person=1, include_gazetteer=False)[:3]
    inp = tmp_path / "bios.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))

    def run(out, threshold):
        r = subprocess.run([sys.executable, "-m", "openk2", "rephrase", str(inp), str(tmp_path / out), "--model",
                            "world:seed=3,people=20", "--styles", "wrap-medium", "--checks", "format,embedding",
                            "--embedding-model", "wordllama", "--embedding-threshold", str(threshold),
                            "--no-progress"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads((tmp_path / out / "run.json").read_text())["counts"], tmp_path / out

    counts, _ = run("lenient", 0.0)
    assert counts["accepted"] == 3 and counts["rejected"] == 0
    counts, out = run("strict", 0.999)
    assert counts["rejected"] == 3
    reasons = [json.loads(x)["reasons"] for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert all("embedding: similarity" in " ".join(r) for r in reasons), reasons
    r = subprocess.run([sys.executable, "-m", "openk2", "rephrase", str(inp), str(tmp_path / "bad"), "--model",
                        "world", "--checks", "embedding", "--embedding-model", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--embedding-model" in r.stdout + r.stderr
