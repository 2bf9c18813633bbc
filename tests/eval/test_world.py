"""The world benchmarks: the speedrun's probes, scored and broken down by the same code, fresh items per seed."""

import json

import pytest

from openk2.data.world import World, world_probes
from openk2.eval.benchmarks.world import probe_breakdown, resolve_world, select_probes
from openk2.eval.registry import get_benchmark
from openk2.eval.task import Completion


@pytest.fixture(scope="module")
def world_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "world.json"
    World.generate(seed=3, n_people=30).save(path)
    return path


def _bench(name, world_file):
    import dataclasses

    return dataclasses.replace(get_benchmark(name), options={"world": str(world_file), "world_qa_fraction": 0.5})


def test_seed_zero_is_the_speedrun_probe_set_and_other_seeds_draw_fresh_people(world_file):
    world = World.load(world_file)
    assert select_probes(world, qa_fraction=0.5, max_people=5) == world_probes(world, max_people=5, qa_fraction=0.5)
    a = {p.person for p in select_probes(world, qa_fraction=0.5, max_people=5, seed=1) if p.split == "seen"}
    b = {p.person for p in select_probes(world, qa_fraction=0.5, max_people=5, seed=2) if p.split == "seen"}
    assert a != b and len(a) == len(b) == 5


@pytest.mark.parametrize("name,split,kinds", [("world-recall", "seen", {"recall"}), ("world-qa", "seen", {"qa"}),
                                              ("world-unseen", "unseen", {"recall", "qa"})])
def test_gold_answers_score_one_and_wrong_ones_zero(world_file, name, split, kinds):
    bench = _bench(name, world_file)
    samples = bench.load(world_file.parent)
    assert samples and all(s.prompt and s.metadata["split"] == split for s in samples)
    assert {s.metadata["kind"] for s in samples} == kinds
    for s in samples:
        assert bench.score(s, Completion(text=s.reference + ", a fine answer.\nmore")).value == 1.0
        assert bench.score(s, Completion(text=s.reference.strip() + "x")).value == 0.0
    assert probe_breakdown(samples, [1.0] * len(samples))[split] == 1.0


def test_world_sources(tmp_path, world_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"data": {"world_seed": 3, "world_people": 30,
                                                                "world_qa_fraction": 0.25}}))
    src = resolve_world(run)
    assert src.qa_fraction == 0.25 and src.world.to_dict() == World.load(world_file).to_dict()
    assert resolve_world(None).origin == "default config"
    with pytest.raises(ValueError, match="no world here"):
        resolve_world(tmp_path / "nothing")


def test_openk2_eval_and_the_speedrun_generate_the_same_probe_answers(tmp_path, world_file):
    """The in-process engine (`openk2 eval --model DIR`) and the speedrun's `complete` give the same greedy
    continuations, so the world benchmarks reproduce the speedrun's probe numbers."""
    import asyncio

    import torch

    from openk2.eval.harness import EvalSettings, read_rows, run_eval
    from openk2.eval.models import ModelHandle
    from openk2.llm import LLMClient
    from openk2.llm.local import LocalBackend
    from openk2.model import build_model, get_preset
    from openk2.serve.model_dir import load_model_dir
    from openk2.serve.server import build_service
    from openk2.serve.testing import make_model_dir, toy_tokenizer
    from openk2.train.evaluation import complete

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = toy_tokenizer()
        model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512), seed=0)
        bundle = load_model_dir(make_model_dir(tmp_path / "m", model, tok), device="cpu")
        backend = LocalBackend(build_service(bundle, max_batch=8), owns_engine=True)
        handle = ModelHandle(LLMClient(backend, model=backend.model_name), "local-test", "local", "m")
        s = EvalSettings(benches=["world-recall", "world-qa"], data_dir=tmp_path, out_dir=tmp_path / "out", limit=8,
                         progress=False, options={"world": str(world_file), "world_qa_fraction": 0.5})

        async def go():
            try:
                return await run_eval(s, handle)
            finally:
                await handle.aclose()

        asyncio.run(go())
        rows = read_rows(tmp_path / "out" / "samples.jsonl")
        ours = complete(bundle.model, bundle.tokenizer, [r["prompt"] for r in rows])
    finally:
        torch.set_num_threads(previous)
    assert len(rows) == 16
    assert [o.strip().split("\n", 1)[0] for o in ours] == [r["response"].strip().split("\n", 1)[0] for r in rows]
