"""Does the demo base's answer attention point at the asked patch? (teacher of the opt-in distillation, #11)

Prints, per LLM layer, how often the vision token with the most attention from the answer-predicting
positions is the relevant patch, and the relevant patch's share of that vision attention.
Run from the project root: ``python benchmarks/teacher_check.py [model_folder]``.
"""

from __future__ import annotations

import sys

import torch

from lightning_lvp import adapter
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.model import PrunedLlava
from lightning_lvp.state import causal_mask
from lightning_lvp.teacher import predicting_positions


@torch.no_grad()
def per_layer_attention(model: PrunedLlava, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, T) attention of the answer-predicting positions (heads and positions summed), and the vision mask."""
    state, _ = model.initial_state(**model_inputs(batch))
    hidden = state.hidden
    mask = causal_mask(state.valid, hidden.shape[1])
    pos_emb = adapter.rotary(model.llava, hidden, state.position_ids)
    predicts = predicting_positions(batch["labels"]) & state.valid
    out = torch.zeros(model.dims.num_layers, *predicts.shape)
    for i in range(model.dims.num_layers):
        for b, t in predicts.nonzero().tolist():
            rows = adapter.attention_probs(
                model.llava, i, hidden[b : b + 1], _slice(pos_emb, b), torch.tensor([t]), mask[b : b + 1]
            )
            out[i, b] += rows[0].sum(0)
        hidden = adapter.run_layer(model.llava, i, hidden, mask, state.position_ids, pos_emb)
    return out, state.vision


def _slice(pos_emb, b):
    return tuple(x[b : b + 1] for x in pos_emb)


def main(model_path: str = "assets/demo_base") -> None:
    torch.set_num_threads(1)
    model = PrunedLlava(adapter.load_llava(model_path), None).eval()
    dm = LlavaDataModule(model_path, dataset="digits", batch_size=32, val_batch_size=64, num_workers=0,
                         cache_dir=".cache", digits=DigitsConfig(question_types=["cell"]))  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    attn, vision = per_layer_attention(model, batch)
    relevant = batch["relevant_mask"] & vision
    rows = torch.arange(vision.shape[0])
    for i, a in enumerate(attn):
        hit = relevant[rows, a.masked_fill(~vision, -1).argmax(1)].float().mean()
        share = ((a * relevant).sum(1) / (a * vision).sum(1)).mean()
        print(
            f"layer {i + 1}: top vision token is the relevant patch {hit:.2f}; relevant share of vision attention {share:.2f}"
        )
    total = attn.sum(0).masked_fill(~vision, -1)
    print(
        f"all layers summed: top vision token is the relevant patch {relevant[rows, total.argmax(1)].float().mean():.2f}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
