"""ACEBench scoring: gold calls in the expected output format score 1.0 on every shipped item; a changed value, a
missing parameter or a wrong function name scores 0; the special phrases; the weighted overall."""

import copy
from pathlib import Path

import pytest

from openk2.eval.benchmarks.acebench import (
    ACEBench,
    category_accuracy,
    outermost_brackets,
    parse_calls,
    render_calls,
    render_special,
)
from openk2.eval.registry import get_benchmark
from openk2.eval.task import Completion

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
need_data = pytest.mark.skipif(not (DATA / "acebench").is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def samples():
    return get_benchmark("acebench").load(DATA)


def _score(sample, text):
    return get_benchmark("acebench").score(sample, Completion(text=text)).value


@need_data
def test_every_shipped_item_scores_one_on_its_gold(samples):
    bench = get_benchmark("acebench")
    assert len(samples) == 736  # 774 shipped items minus the 38 agent ones
    failures = [s.id for s in samples if bench.score(s, Completion(text=bench.gold_text(s))).value != 1.0]
    assert failures == []


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 17
    if isinstance(value, list):
        return [*value, "zzqx extra"]
    if isinstance(value, dict):
        return {**value, "zzqx": 1}
    return "zzqx changed"


@need_data
def test_perturbed_calls_score_zero(samples):
    checked = {"value": 0, "missing": 0, "name": 0}
    for s in samples:
        if s.category.startswith("special"):
            continue
        gt = s.reference["ground_truth"]
        gold = copy.deepcopy(gt[0] if isinstance(gt, list) else gt)
        first = next(iter(gold))
        assert _score(s, render_calls({first + "Zz": gold[first], **{k: v for k, v in gold.items() if k != first}})) \
            == 0.0, s.id
        checked["name"] += 1
        params = {p: v for p, v in gold[first].items() if v != ""}
        if not params:
            continue
        p, v = next(iter(params.items()))
        assert _score(s, render_calls({**gold, first: {**gold[first], p: _changed(v)}})) == 0.0, (s.id, p)
        checked["value"] += 1
        assert _score(s, render_calls({**gold, first: {k: x for k, x in gold[first].items() if k != p}})) == 0.0, s.id
        checked["missing"] += 1
    assert min(checked.values()) > 500, checked


@need_data
def test_special_phrases(samples):
    by_cat = {}
    for s in samples:
        by_cat.setdefault(s.category, s)
    err, irr = by_cat["special_error_param"], by_cat["special_irrelevant"]
    inc = next(s for s in samples if s.category == "special_incomplete"
               and len(next(iter(s.reference["ground_truth"].values()))) > 1)
    [(api, missing)] = inc.reference["ground_truth"].items()
    assert _score(inc, render_special("special_incomplete", {api: missing[:-1]})) == 0.0
    assert _score(inc, render_special("special_incomplete", {"OtherApi": missing})) == 0.0
    wrong = err.reference["ground_truth"]
    assert _score(err, render_special("special_error_param", {k: ["zzqx"] for k in wrong})) == 0.0
    assert _score(irr, "[SomeApi(a=1)]") == 0.0
    assert _score(irr, 'I cannot: ["Due to the limitations of the function, I cannot solve this problem."]') == 1.0


def test_parser_forms():
    text = "Sure! [A.b(x='a]b', n=-3, f=true, l=[1, {'k': None}]), C()] trailing"
    assert outermost_brackets(text).startswith("[A.b(") and outermost_brackets("none") is None
    assert parse_calls(text) == [{"A.b": {"x": "a]b", "n": -3, "f": True, "l": [1, {"k": None}]}}, {"C": {}}]
    for bad in ("no list", "[1, 2]", "[f(1)]"):
        with pytest.raises((ValueError, SyntaxError)):
            parse_calls(bad)


def test_matching_rules():
    bench = ACEBench(name="t")
    functions = [{"name": "F", "parameters": {"type": "object", "properties": {}}}]

    def score(gt, text):
        s = bench.sample_of("normal_single_turn_single_function", {"id": "normal_x_0", "question": "q",
                                                                    "function": functions}, {"ground_truth": gt})
        return bench.score(s, Completion(text=text)).value

    assert score({"F": {"city": "New York"}}, "[F(city='new-york city')]") == 1.0  # normalized substring
    assert score({"F": {"n": 2}}, "[F(n=2.0)]") == 1.0
    assert score({"F": {"n": 2, "opt": ""}}, "[F(n=2)]") == 1.0  # "" marks an optional parameter
    assert score({"F": {"n": 2}}, "[F(n=2, extra=1)]") == 0.0
    assert score({"F_1": {"n": 1}, "F_2": {"n": 2}}, "[F(n=2), F(n=1)]") == 1.0
    assert score({"F_1": {"n": 1}, "F_2": {"n": 2}}, "[F(n=1), F(n=1)]") == 0.0  # one to one
    assert score([{"F": {"n": 1}}, {"F": {"n": 3}}], "[F(n=3)]") == 1.0  # alternatives


def test_overall_weights_and_multi_turn_end_accuracy():
    scores = {"normal_atom_bool_0": [1.0], "normal_atom_bool_1": [0.0],
              "normal_multi_turn_user_adjust_0_0": [1.0], "normal_multi_turn_user_adjust_0_1": [0.0],
              "normal_multi_turn_user_adjust_1_0": [1.0],
              "special_irrelevant_0": [1.0], "special_incomplete_0": [0.0]}
    acc = category_accuracy(scores)
    assert acc == {"normal_atom_bool": 0.5, "normal_multi_turn_user_adjust": 0.5, "special_irrelevant": 1.0,
                   "special_incomplete": 0.0}
    overall = get_benchmark("acebench").aggregate(scores)
    assert overall == pytest.approx(100 * (0.578 * 0.5 + 0.2676 * 0.5) / (0.578 + 0.2676))
    assert get_benchmark("acebench-special").aggregate(scores) == pytest.approx(50.0)


@need_data
def test_data_errors_name_the_file(tmp_path):
    base = tmp_path / "acebench" / "data_en"
    (base / "possible_answer").mkdir(parents=True)
    src = DATA / "acebench" / "data_en"
    for name in ("data_special_irrelevant.json", "data_special_incomplete.json", "data_special_error_param.json"):
        (base / name).write_text((src / name).read_text())
        (base / "possible_answer" / name).write_text((src / "possible_answer" / name).read_text())
    bench = get_benchmark("acebench-special")
    assert len(bench.load(tmp_path)) == 114
    lines = (base / "data_special_irrelevant.json").read_text().splitlines()
    lines[2] = lines[2][:40]
    (base / "data_special_irrelevant.json").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"data_special_irrelevant.json:3: not valid JSON"):
        bench.load(tmp_path)
