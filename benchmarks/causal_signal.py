"""Does the paper's causal loss alone tell an LLM-input decision module which patch a question needs?
(issue #11, docs/RESULTS.md §5.3)

Two measurements on the demo base and the digits cell questions, no relevance label in any loss:

* ``gradient``: the straight-through gradient of the causal loss on each vision token's keep logit
  under random decisions; prints how often the asked patch gets the most negative gradient
  ("keeping it lowers the loss most"), split by whether it was kept or dropped, and the largest
  wrong-signed outliers.
* ``train``: one LVPruning module on the LLM input (rotary, input norm) trained with the causal loss
  only, its kept ratio held at ``ratio`` by the integral controller (``ratio_control``), Adam at a
  constant learning rate; prints the held-out top-4 recall of the asked patch every 25 steps
  (chance 4/36 = 0.11; the supervised probe `probe relevance` reaches 1.0 with the label).

Run from the project root:
``python benchmarks/causal_signal.py gradient`` and
``python benchmarks/causal_signal.py train --steps 600 --ratio 0.5``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_lvp import adapter
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.methods.lvp import LVPruning
from lightning_lvp.model import PrunedLlava


def build(
    model_path: str,
    cache_dir: str,
    ratio_control: float,
    grad_clip_quantile: float | None,
    logit_bound: float | None = None,
):
    llava = adapter.load_llava(model_path)
    method = LVPruning(
        after_layers=[0], keep_ratios=[4 / 36], train_ratios=[0.5], num_heads=4, input_norm=True, rotary=True,
        ratio_control=ratio_control, grad_clip_quantile=grad_clip_quantile, logit_bound=logit_bound,
    )  # fmt: skip
    model = PrunedLlava(llava, method)
    data = LlavaDataModule(
        model_path, dataset="digits", digits=DigitsConfig(question_types=["cell"]), cache_dir=cache_dir,
        batch_size=32, val_batch_size=64, num_workers=0,
    )  # fmt: skip
    data.setup("fit")
    return model, method, data


def relevant_rank(grad: torch.Tensor, vision: torch.Tensor, relevant: torch.Tensor) -> list[int]:
    """Per sample: 1 + the number of vision tokens whose gradient is more negative than the asked patch's."""
    ranks = []
    for g, v, r in zip(grad, vision, relevant):
        gv, rv = g[v], r[v]
        ranks.append(int((gv < gv[rv][0]).sum()) + 1)
    return ranks


def gradient(model: PrunedLlava, method: LVPruning, data, batches: int) -> None:
    saved = []
    controlled = method._controlled

    def keep_logits(gamma, alive, stage):  # the Gumbel logits the decisions are drawn from
        out = controlled(gamma, alive, stage)
        out.retain_grad()
        saved.append(out)
        return out

    method._controlled = keep_logits
    model.train()
    rows = []  # (kept, rank, gradient of the asked patch)
    for _, batch in zip(range(batches), data.train_dataloader()):
        saved.clear()
        out = model.forward_train(**model_inputs(batch), labels=batch["labels"], tau=1.0)
        out.loss_causal.backward()
        grad = saved[0].grad[..., 0]
        vision, relevant = batch["vision_mask"].bool(), batch["relevant_mask"].bool()
        ranks = relevant_rank(grad, vision, relevant)
        for i, rank in enumerate(ranks):
            j = relevant[i].nonzero()[0, 0]
            rows.append((bool(out.decisions[0][i, j]), rank, float(grad[i, j]), float(grad[i][vision[i]].abs().mean())))
    method._controlled = controlled
    for kept in (False, True):
        sel = [r for r in rows if r[0] == kept]
        top1 = sum(r[1] == 1 for r in sel) / max(1, len(sel))
        wrong = sum(r[2] > 0 for r in sel) / max(1, len(sel))
        print(f"asked patch {'kept' if kept else 'dropped'}: {len(sel)} samples, most negative gradient in {top1:.2f}, "
              f"positive (wrong sign) in {wrong:.2f}, median |g| / mean |g| of all patches "
              f"{torch.tensor([abs(r[2]) / max(r[3], 1e-30) for r in sel]).median():.1f}")  # fmt: skip
    worst = max(rows, key=lambda r: r[2])
    print(f"largest wrong-signed asked-patch gradient: {worst[2]:+.2e} (that sample's mean |g| {worst[3]:.1e})")


@torch.no_grad()
def recall_at_4(model: PrunedLlava, val: list[dict]) -> float:
    model.eval()
    hits = total = 0
    for batch in val:
        out = model.forward_infer(**model_inputs(batch), ratios=[4 / 36])
        relevant, vision = batch["relevant_mask"].bool(), batch["vision_mask"].bool()
        for i in range(relevant.shape[0]):
            hits += int((out.kept_patches[0][i] & relevant[i][vision[i]]).any())
            total += 1
    model.train()
    return hits / total


def train(
    model: PrunedLlava,
    method: LVPruning,
    data,
    steps: int,
    lr: float,
    ratio: float,
    seed: int | None,
    weight_decay: float = 0.0,
) -> None:
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    val = [b for _, b in zip(range(2), data.val_dataloader())]
    target, start, loader = torch.tensor([ratio]), time.time(), iter(data.train_dataloader())
    for step in range(steps + 1):
        if step % 25 == 0:
            print(f"step {step:4d}  recall@4 {recall_at_4(model, val):.3f}  bias {float(method.ratio_bias[0]):+.2f}  "
                  f"{time.time() - start:.0f} s", flush=True)  # fmt: skip
        if step == steps:
            break
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(data.train_dataloader())
            batch = next(loader)
        out = model.forward_train(**model_inputs(batch), labels=batch["labels"], tau=1.0)
        opt.zero_grad()
        out.loss_causal.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        opt.step()
        method.control_ratios(out.kept.detach().mean(0), target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["gradient", "train"], help="which measurement")
    p.add_argument("--model_path", default="assets/demo_base", help="the frozen base")
    p.add_argument("--cache_dir", default=".cache", help="digits cache folder")
    p.add_argument("--batches", type=int, default=3, help="gradient: training batches measured")
    p.add_argument("--steps", type=int, default=600, help="train: optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="train: AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="train: AdamW weight decay")
    p.add_argument("--ratio", type=float, default=0.5, help="train: kept ratio held by the controller")
    p.add_argument("--ratio_control", type=float, default=1.0, help="controller gain")
    p.add_argument("--grad_clip_quantile", type=float, default=None, help="per-sample gradient cap (off)")
    p.add_argument("--logit_bound", type=float, default=None, help="bound of the centered log-odds (off)")
    p.add_argument(
        "--seed", type=int, default=None, help="re-seed before the training loop (default: the stream after set-up)"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    model, method, data = build(
        args.model_path, args.cache_dir, args.ratio_control, args.grad_clip_quantile, args.logit_bound
    )
    if args.what == "gradient":
        gradient(model, method, data, args.batches)
    else:
        train(model, method, data, args.steps, args.lr, args.ratio, args.seed, args.weight_decay)


if __name__ == "__main__":
    main()
