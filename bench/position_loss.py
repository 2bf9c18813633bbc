"""Next-token loss of a model directory by position, on world biographies packed into 1,024-token rows, as trained
and with YaRN x4 applied at load time (no training): does the model work past its pretraining length?

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/position_loss.py runs/nano

docs/experiments.md ("SFT stage: looking for the gain") has the result for the demo model.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from openk2.data.world import World, world_documents
from openk2.model.transformer import build_model
from openk2.model_dir import load_model_dir

BUCKETS = ((0, 128), (128, 256), (256, 384), (384, 512), (512, 768), (768, 1024))


def losses_by_position(model: torch.nn.Module, rows_BT: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logits_BTV = model(rows_BT[:, :-1], return_logits=True).logits.float()
    loss_BT = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), rows_BT[:, 1:].flatten(),
                                                reduction="none").view(rows_BT.shape[0], -1)
    return [loss_BT[:, a:b].mean().item() for a, b in BUCKETS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--original-length", type=int, default=256, help="the pretraining sequence length")
    a = p.parse_args()
    lm = load_model_dir(a.model_dir)
    ids: list[int] = []
    for doc in world_documents(World.generate(0, 100), "train", renderings_per_person=1):
        ids += lm.tokenizer.encode(doc)
        if len(ids) >= a.rows * 1025:
            break
    rows_BT = torch.tensor(ids[: a.rows * 1025]).view(a.rows, 1025)
    yarn = dataclasses.replace(lm.model.config, rope_scaling={
        "type": "yarn", "factor": 1024 / a.original_length, "original_max_position_embeddings": a.original_length})
    stretched = build_model(yarn)
    stretched.load_state_dict(lm.model.state_dict())
    stretched.eval()
    print("| positions | loss, as trained | loss, YaRN applied |\n|---|---:|---:|")
    for (lo, hi), plain, scaled in zip(BUCKETS, losses_by_position(lm.model, rows_BT),
                                       losses_by_position(stretched, rows_BT), strict=True):
        print(f"| {lo}-{hi} | {plain:.3f} | {scaled:.3f} |")


if __name__ == "__main__":
    main()
