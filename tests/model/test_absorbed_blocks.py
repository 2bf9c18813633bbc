"""Cached (absorbed-MLA) attention over a long prefill runs in query blocks; the blocks give the same logits."""

import torch

import openk2.model.attention as attention
from openk2.model import build_model, get_preset
from openk2.model.generate import generate


def test_query_blocked_prefill_matches_one_block(monkeypatch):
    model = build_model(get_preset("tiny", max_position_embeddings=512), seed=0).eval()
    ids_BT = torch.randint(0, 200, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole_BT = generate(model, ids_BT, 6, compile=False)
        # 2 rows x 4 heads x 70 keys per query row: a budget of 7 query rows per block
        monkeypatch.setattr(attention, "_ABSORBED_SCORE_BLOCK", 2 * 4 * 70 * 7)
        blocked_BT = generate(model, ids_BT, 6, compile=False)
    assert torch.equal(whole_BT, blocked_BT)
