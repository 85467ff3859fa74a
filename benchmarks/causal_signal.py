"""Does the paper's causal loss alone tell an LLM-input decision module which patch a question needs?
(issue #11, docs/RESULTS.md §5.3)

Two measurements on the demo base and the digits cell questions, no relevance label in any loss:

* ``gradient``: the straight-through gradient of the causal loss on each vision token's keep logit
  under random decisions; prints how often the asked patch gets the most negative gradient
  ("keeping it lowers the loss most"), split by whether it was kept or dropped, and the largest
  wrong-signed outliers.
* ``effects``: the mean causal loss with a vision token kept minus with it dropped, under random
  decisions, for the asked patch and the others (``--after_layer`` moves the pruning point).
* ``train``: one LVPruning module on the LLM input (rotary, input norm) trained with the causal loss
  only, its kept ratio held at ``ratio`` by the integral controller (``ratio_control``), Adam at a
  constant learning rate; prints the held-out top-4 (and top-18) recall of the asked patch every 25 steps
  (chance 4/36 = 0.11; the supervised probe `probe relevance` reaches 1.0 with the label).

Run from the project root:
``python benchmarks/causal_signal.py effects --batches 40 [--after_layer 1]``,
``python benchmarks/causal_signal.py gradient`` and
``python benchmarks/causal_signal.py train --steps 600 --ratio 0.5``; the score-function estimator with
standardized log-odds (docs/RESULTS.md §5.3):
``python benchmarks/causal_signal.py train --steps 900 --lr 3e-4 --estimator score_function --logit_scale 0.3``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_lvp import adapter
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig
from lightning_lvp.decision import per_sample_nll, score_function_surrogate
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.methods.lvp import LVPruning
from lightning_lvp.model import PrunedLlava


def build(
    model_path: str,
    cache_dir: str,
    ratio_control: float,
    grad_clip_quantile: float | None,
    logit_bound: float | None = None,
    estimator: str = "straight_through",
    logit_scale: float | None = None,
    num_heads: int = 4,
    after_layer: int = 0,
    batch_size: int = 32,
):
    llava = adapter.load_llava(model_path)
    method = LVPruning(
        after_layers=[after_layer], keep_ratios=[4 / 36], train_ratios=[0.5], num_heads=num_heads, input_norm=True, rotary=True,
        ratio_control=ratio_control, grad_clip_quantile=grad_clip_quantile, logit_bound=logit_bound,
        estimator=estimator, logit_scale=logit_scale,
    )  # fmt: skip
    model = PrunedLlava(llava, method)
    data = LlavaDataModule(
        model_path, dataset="digits", digits=DigitsConfig(question_types=["cell"]), cache_dir=cache_dir,
        batch_size=batch_size, val_batch_size=64, num_workers=0,
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
def effects(model: PrunedLlava, data, batches: int) -> None:
    """Mean causal loss with a token kept minus with it dropped, under random 50 % decisions of the
    untrained module, for the asked patch and for the others by their place relative to it."""
    model.train()
    losses, keeps, asked = [], [], []
    for _, batch in zip(range(batches), data.train_dataloader()):
        out = model.forward_train(**model_inputs(batch), labels=batch["labels"], tau=1.0)
        nll = per_sample_nll(out.logits, out.targets, out.sample_index, batch["input_ids"].shape[0])
        vision, relevant = batch["vision_mask"].bool(), batch["relevant_mask"].bool()
        for i in range(nll.shape[0]):
            losses.append(float(nll[i]))
            keeps.append(out.decisions[0][i][vision[i]].bool())
            asked.append(int(relevant[i][vision[i]].nonzero()[0, 0]))
    loss, keep, a = torch.tensor(losses)[:, None], torch.stack(keeps), torch.tensor(asked)
    n = keep.shape[1]
    side = round(n**0.5)
    idx = torch.arange(n)
    row, col, arow, acol = idx // side, idx % side, (a // side)[:, None], (a % side)[:, None]
    is_asked = idx[None] == a[:, None]
    groups = {
        "asked patch": is_asked,
        "same row": (row[None] == arow) & ~is_asked,
        "same column": (col[None] == acol) & ~is_asked,
        "adjacent": (row[None] - arow).abs() + (col[None] - acol).abs() == 1,
        "elsewhere": (row[None] != arow) & (col[None] != acol),
    }
    print(f"{len(losses)} training questions, random ~50 % decisions, mean causal loss {float(loss.mean()):.3f}")
    for name, m in groups.items():
        kept, dropped = (keep & m).float(), (~keep & m).float()
        effect = (kept * loss).sum() / kept.sum() - (dropped * loss).sum() / dropped.sum()
        print(f"{name:12s} loss(kept) - loss(dropped) = {float(effect):+.3f} nats  ({int(m.sum())} token-questions)")


@torch.no_grad()
def recall_at(model: PrunedLlava, val: list[dict], k: int = 4) -> float:
    """Fraction of held-out questions whose asked patch is among the module's top ``k`` of 36."""
    model.eval()
    hits = total = 0
    for batch in val:
        out = model.forward_infer(**model_inputs(batch), ratios=[k / 36])
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
            print(f"step {step:4d}  recall@4 {recall_at(model, val):.3f}  recall@18 {recall_at(model, val, 18):.3f}  bias {float(method.ratio_bias[0]):+.2f}  "
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
        if method.estimator == "score_function":
            nll = per_sample_nll(out.logits, out.targets, out.sample_index, batch["input_ids"].shape[0])
            loss, _ = score_function_surrogate(method.sampled, out.decisions, batch["vision_mask"].bool(), nll)
        else:
            loss = out.loss_causal
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        opt.step()
        method.control_ratios(out.kept.detach().mean(0), target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["gradient", "train", "effects"], help="which measurement")
    p.add_argument("--after_layer", type=int, default=0, help="the module's place (0 = the LLM input)")
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
        "--estimator", default="straight_through", choices=["straight_through", "score_function"],
        help="train: gradient estimate of the causal loss (the paper: straight_through)",
    )  # fmt: skip
    p.add_argument("--logit_scale", type=float, default=None, help="standardize the controlled log-odds x this (off)")
    p.add_argument("--num_heads", type=int, default=4, help="heads per block of the module")
    p.add_argument("--batch_size", type=int, default=32, help="training batch size")
    p.add_argument(
        "--seed", type=int, default=None, help="re-seed before the training loop (default: the stream after set-up)"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    model, method, data = build(
        args.model_path, args.cache_dir, args.ratio_control, args.grad_clip_quantile, args.logit_bound, args.estimator,
        args.logit_scale, args.num_heads, args.after_layer, args.batch_size,
    )  # fmt: skip
    if args.what == "effects":
        effects(model, data, args.batches)
    elif args.what == "gradient":
        gradient(model, method, data, args.batches)
    else:
        train(model, method, data, args.steps, args.lr, args.ratio, args.seed, args.weight_decay)


if __name__ == "__main__":
    main()
