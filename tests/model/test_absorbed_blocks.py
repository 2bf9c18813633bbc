"""Cached attention: the absorbed form over a long prefill runs in query blocks (the blocks give the same logits),
and a long chunk may run in the expanded form instead (the same logits as the absorbed form)."""

import pytest
import torch

import openk2.model.attention as attention
from openk2.model import build_model, get_preset
from openk2.model.generate import generate


def test_query_blocked_prefill_matches_one_block(monkeypatch):
    model = build_model(get_preset("tiny", max_position_embeddings=512), seed=0).eval()
    monkeypatch.setattr(attention.MLA, "_expand_pays", lambda self, T: False)
    ids_BT = torch.randint(0, 200, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole_BT = generate(model, ids_BT, 6, compile=False)
        # 2 rows x 4 heads x 70 keys per query row: a budget of 7 query rows per block
        monkeypatch.setattr(attention, "_ABSORBED_SCORE_BLOCK", 2 * 4 * 70 * 7)
        blocked_BT = generate(model, ids_BT, 6, compile=False)
    assert torch.equal(whole_BT, blocked_BT)


@pytest.mark.parametrize("preset, kernel", [("tiny", True), ("nano", True), ("nano", False)])
def test_expanded_prefill_matches_absorbed(preset, kernel, monkeypatch):
    """Left padding, then a second chunk on top of the cache: both forms give the same logits, the expanded one
    through the kernel library's `masked_attention` (where it builds) and through `blocked_masked_attention`."""
    monkeypatch.setattr(attention, "_MASKED_ATTENTION_KERNEL", kernel)
    model = build_model(get_preset(preset), seed=0).eval()
    ids_BT = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    valid_BT = torch.ones(2, 40, dtype=torch.bool)
    valid_BT[1, :9] = False

    def logits(expand: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(attention.MLA, "_expand_pays", lambda self, T: expand)
        with torch.no_grad():
            cache = model.new_cache(2, 64)
            first = model(ids_BT, cache=cache, valid_BT=valid_BT).logits
            second = model(ids_BT[:, :7], cache=cache).logits
        return first, second

    (expanded, expanded_2), (absorbed, absorbed_2) = logits(True), logits(False)
    torch.testing.assert_close(expanded[0], absorbed[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(expanded[1, 9:], absorbed[1, 9:], atol=2e-5, rtol=1e-5)  # padding rows are unused
    torch.testing.assert_close(expanded_2, absorbed_2, atol=2e-5, rtol=1e-5)


def test_expanded_form_only_for_long_chunks():
    mla = build_model(get_preset("nano"), seed=0).model.layers[0].self_attn
    assert not mla._expand_pays(1) and not mla._expand_pays(16)  # decode, short turns: absorbed
    assert mla._expand_pays(512)  # a prompt: expanded
