"""`huge_pages`: weights copied onto advised 2 MiB mappings keep their values, their Parameter objects, their ties
and their trainability, and nothing moves where the kernel would not honour the advice."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import openk2.model.huge_pages as huge_pages
from openk2.model import build_model, get_preset


def _mapping_flags(ptr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds address `ptr` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


@pytest.fixture
def madvise_mode(monkeypatch):
    if huge_pages.thp_mode() == "unavailable":
        pytest.skip("no transparent huge pages on this platform")
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")


def test_copy_is_equal_aligned_and_advised(madvise_mode):
    t = torch.randn(1000, 300)
    c = huge_pages.huge_page_copy(t)
    assert torch.equal(c, t) and c.is_contiguous() and c.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert c.untyped_storage().nbytes() == t.numel() * 4  # no padding in its storage (torch.save writes it all)
    assert "hg" in _mapping_flags(c.data_ptr())  # MADV_HUGEPAGE took


def test_moving_keeps_parameters_ties_values_and_training(madvise_mode):
    model = build_model(get_preset("tiny", tie_word_embeddings=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {name: p.detach().clone() for name, p in params.items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    tokens = model.generate(ids, 6, compile=False)
    with torch.inference_mode():  # as `generate` calls it: the weights must stay normal, trainable tensors
        moved = huge_pages.move_weights_to_huge_pages(model, min_bytes=64 * 1024)
    large = [name for name, p in params.items() if p.numel() * 4 >= 64 * 1024]
    assert moved > 0 and large
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[name] is p for name, p in params.items())  # the same Parameter objects
    for name, p in after.items():
        assert torch.equal(p, before[name]) and not p.is_inference()
        assert (p.data_ptr() % huge_pages.HUGE_PAGE == 0) == (name in large), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(model.generate(ids, 6, compile=False), tokens)
    assert huge_pages.move_weights_to_huge_pages(model, min_bytes=64 * 1024) == 0  # once
    # Saved and loaded like any weights, without the mappings' padding.
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() < 1.1 * sum(p.numel() * 4 for p in model.parameters()) + 100_000
    buf.seek(0)
    assert all(torch.equal(v, before[k]) for k, v in torch.load(buf).items() if k in before)
    # Training updates the moved weights in place.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    w = model.lm_head.weight
    assert w.data_ptr() % huge_pages.HUGE_PAGE == 0 and not torch.equal(w, before["lm_head.weight"])


def test_nothing_moves_where_the_advice_means_nothing(monkeypatch):
    model = build_model(get_preset("tiny"), seed=0)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for mode in ("always", "never", "unavailable"):
        monkeypatch.setattr(huge_pages, "thp_mode", lambda mode=mode: mode)
        assert huge_pages.move_weights_to_huge_pages(model, min_bytes=0) == 0
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setenv("OPENK2_HUGE_PAGES", "0")
    assert huge_pages.move_weights_to_huge_pages(model, min_bytes=0) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "_THP_ENABLED", f)
    assert huge_pages.thp_mode() in ("madvise", "unavailable")  # "unavailable" without MADV_HUGEPAGE
    monkeypatch.setattr(huge_pages, "_THP_ENABLED", tmp_path / "missing")
    assert huge_pages.thp_mode() == "unavailable"
