"""Capacity probes on a frozen base: can its hidden states say WHICH patch a question needs, and WHERE a patch is?

``python -m lightning_lvp probe relevance -c experiments/demo.yaml`` (lightning_lvp/commands/probe.py) trains a
:class:`~lightning_lvp.decision.DecisionModule` (the LVPruning module) with a DIRECT label: binary
cross-entropy between its keep/drop log-odds and the data set's relevant patches (``relevant_mask``
of the batch), on the frozen base's hidden states at one pruning point (0 = LLM input, l = after
LLM layer l), then reports the top-k recall of the relevant patches on the validation split
(held-out images and questions). Not the paper's objective: an upper bound of what the module can
express at that point; if it stays at chance, no training recipe of the paper's loss can do better.

``python -m lightning_lvp probe position -c experiments/demo.yaml`` fits a linear classifier from
the vision tokens' hidden states to their patch index at given LLM depths (train split) and scores
it on the validation split: real CLIP features carry absolute position, a content-only decision
module needs it to tell which patch the question names.

Pure PyTorch over the adapter (no Lightning). Both print a table and can write JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lightning_lvp import adapter
from lightning_lvp.decision import DecisionModule
from lightning_lvp.eval.teacher_forced import model_inputs, relevant_kept_fraction
from lightning_lvp.methods.base import keep_counts, topk_keep
from lightning_lvp.model import PrunedLlava
from lightning_lvp.state import SeqState, causal_mask, gather_rows, pack_index

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ hidden states
@dataclass
class Tokens:
    """The vision and key-text tokens of a batch at one depth, packed (right-aligned, in order).

    Attributes:
        vision: (B, Nv, D) hidden states of the image tokens (patch order).
        vision_valid: (B, Nv) bool, False for filler slots.
        text: (B, Nt, D) hidden states of the key text tokens (the prompt, as LVPruning's ``keys="prompt"``).
        text_valid: (B, Nt) bool.
        relevant: (B, Nv) bool, the relevant patches (all False when the batch has no ``relevant_mask``).
        patch: (B, Nv) long, patch index of each vision slot (-1 for filler).
        vision_pos, text_pos: (B, Nv) / (B, Nt) original position ids (for a ``rotary`` module).
    """

    vision: torch.Tensor
    vision_valid: torch.Tensor
    text: torch.Tensor
    text_valid: torch.Tensor
    relevant: torch.Tensor
    patch: torch.Tensor
    vision_pos: torch.Tensor | None = None
    text_pos: torch.Tensor | None = None


@torch.no_grad()
def hidden_at_depths(
    model: PrunedLlava, batch: dict[str, Any], depths: Sequence[int]
) -> tuple[SeqState, dict[int, torch.Tensor]]:
    """Runs the frozen base (unpruned) and keeps the hidden states at each requested depth.

    Args:
        model: the base (its method is not used).
        batch: collated batch (docs/DESIGN.md).
        depths: 0 = LLM input (image features merged), l = output of LLM layer l (1-based), as ``after_layers``.

    Returns:
        The input layout and ``{depth: (B, T, D) hidden states}``.
    """
    num_layers = model.dims.num_layers
    if any(not 0 <= d < num_layers for d in depths):
        raise ValueError(
            f"probe depths must be in [0, {num_layers}) for an LLM with {num_layers} layers, got {list(depths)}"
        )
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    state, _ = model.initial_state(**inputs)
    hidden = state.hidden
    out = {0: hidden} if 0 in depths else {}
    mask = causal_mask(state.valid, hidden.shape[1])
    pos_emb = adapter.rotary(model.llava, hidden, state.position_ids)
    for i in range(max(depths)):
        hidden = adapter.run_layer(model.llava, i, hidden, mask, state.position_ids, pos_emb)
        if i + 1 in depths:
            out[i + 1] = hidden
    return state, out


def pack_tokens(state: SeqState, hidden: torch.Tensor, relevant_mask: torch.Tensor | None) -> Tokens:
    """Gathers the vision tokens and the key text tokens of ``hidden`` (B, T, D) by ``state``'s layout."""
    qi, qv = pack_index(state.alive_vision)
    ki, kv = pack_index(state.key_text & state.valid)
    rel = torch.zeros_like(qv) if relevant_mask is None else gather_rows(relevant_mask.to(qv.device).bool(), qi) & qv
    patch = torch.where(qv, gather_rows(state.patch_index, qi), -1)
    pos = state.position_ids
    return Tokens(
        gather_rows(hidden, qi), qv, gather_rows(hidden, ki), kv, rel, patch, gather_rows(pos, qi), gather_rows(pos, ki)
    )


def batches(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Endless iteration over a (re-iterable) loader."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yielded no batches")


# ---------------------------------------------------------------------------------- relevance
def keep_log_odds(module: DecisionModule, tokens: Tokens) -> torch.Tensor:
    """(B, Nv) gamma_keep - gamma_drop: what the Gumbel decision and LVPruning's ``log_odds`` ranking read."""
    gamma = module(tokens.vision, tokens.text, tokens.text_valid, tokens.vision_pos, tokens.text_pos)
    return gamma[..., 0] - gamma[..., 1]


def relevance_loss(scores: torch.Tensor, tokens: Tokens, pos_weight: float = 1.0) -> torch.Tensor:
    """BCE between the keep log-odds and the relevant-patch label, over the real vision slots."""
    weight = torch.tensor(pos_weight, device=scores.device)
    target = tokens.relevant.float()[tokens.vision_valid]
    return F.binary_cross_entropy_with_logits(scores[tokens.vision_valid], target, pos_weight=weight)


def topk_recall(scores: torch.Tensor, tokens: Tokens, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall of the relevant patches in the ``k`` best-scored vision tokens.

    Returns:
        (B,) fraction of each sample's relevant patches among its top k (NaN without relevant patches;
        see :func:`~lightning_lvp.eval.teacher_forced.relevant_kept_fraction`) and (B,) bool, all of them in the top k.
    """
    counts = torch.full((scores.shape[0],), k, dtype=torch.long, device=scores.device)
    top = topk_keep(scores, tokens.vision_valid, counts)
    recall = relevant_kept_fraction(top, tokens.relevant)
    return recall, recall == 1.0


def token_stream(
    model: PrunedLlava, loader: Iterable[dict[str, Any]], depth: int, max_batches: int | None = None
) -> Iterator[Tokens]:
    """:class:`Tokens` at ``depth`` of each batch of ``loader`` (at most ``max_batches``)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        state, hidden = hidden_at_depths(model, batch, [depth])
        yield pack_tokens(state, hidden[depth], batch.get("relevant_mask"))


def with_position_codes(tokens: Tokens, codes: torch.Tensor) -> Tokens:
    """Adds a fixed code per patch index to the vision states (``codes``: (N, D)): an ORACLE position signal,
    to test the module itself where the base's features carry no position."""
    add = codes.to(tokens.vision)[tokens.patch.clamp(min=0)] * tokens.vision_valid[..., None]
    return replace(tokens, vision=tokens.vision + add)


def score_relevance(module: DecisionModule, tokens: Iterable[Tokens], k: int) -> dict[str, float]:
    """Top-k recall of the module's ranking (samples with relevant patches only).

    Returns:
        ``recall`` (mean over samples of the fraction of their relevant patches in the top k),
        ``all_in_topk`` (fraction of samples with every relevant patch in the top k), ``chance``
        (mean k / vision tokens: the recall of a random ranking), ``n`` (samples scored).
    """
    recalls, hits, n_vision = [], [], []
    was_training = module.training
    module.eval()
    for t in tokens:
        with torch.no_grad():
            recall, hit = topk_recall(keep_log_odds(module, t), t, k)
        labelled = ~recall.isnan()
        recalls.append(recall[labelled].cpu())
        hits.append(hit[labelled].cpu())
        n_vision.append(t.vision_valid.sum(1)[labelled].float().cpu())
    module.train(was_training)
    recall = torch.cat(recalls) if recalls else torch.zeros(0)
    if not len(recall):
        raise ValueError("no validation sample carries relevant patches: the relevance probe needs `relevant_patches`")
    return {
        "recall": float(recall.mean()),
        "all_in_topk": float(torch.cat(hits).float().mean()),
        "chance": float((k / torch.cat(n_vision)).clamp(max=1.0).mean()),
        "n": int(len(recall)),
    }


def train_relevance(
    module: DecisionModule,
    tokens: Iterable[Tokens],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    pos_weight: float = 1.0,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> tuple[list[float], list[dict[str, float]]]:
    """AdamW on :func:`relevance_loss` for ``steps`` batches of ``tokens``.

    Args:
        evaluate: called every ``eval_every`` steps (before the last), its ``recall`` goes into the history.

    Returns:
        The loss of every step and the history (``step``, ``loss``, ``recall``).
    """
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    module.train()
    losses, history = [], []
    for step, t in zip(range(steps), tokens):
        loss = relevance_loss(keep_log_odds(module, t), t, pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            res = evaluate()
            history.append({"step": step + 1, "loss": losses[-1], "recall": res["recall"]})
            log.info("probe relevance step %d loss %.4f recall %.3f", step + 1, losses[-1], res["recall"])
    if len(losses) < steps:
        raise ValueError(f"the training data ran out after {len(losses)} of {steps} steps")
    return losses, history


@dataclass
class RelevanceProbeArgs:
    """Settings of the supervised relevance probe (see :func:`relevance_probe`).

    Attributes:
        depth: pruning point read by the module (0 = LLM input, l = after LLM layer l).
        k: top-k of the recall (the command's default: the last-stage count of the method's schedule).
        steps: optimizer steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        pos_weight: BCE weight of the positive (relevant) class.
        dim: module width C (None = LLM hidden size).
        num_heads: attention heads per block.
        num_blocks: cross-attention blocks.
        ffn_mult: FFN expansion.
        input_norm: LayerNorm on the LLM hidden states first.
        rotary: RoPE at the tokens' original positions in the module's cross-attention (not in the paper).
        eval_batches: validation batches scored.
        eval_every: also score every this many steps (0 = only at the end).
        oracle_position: add a fixed random code per patch index to the vision states the module reads
            (:func:`with_position_codes`; not a property of the base).
        seed: seed of the module's initialisation and of the training-batch order.
    """

    depth: int = 0
    k: int | None = None
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    pos_weight: float = 1.0
    dim: int | None = None
    num_heads: int = 4
    num_blocks: int = 2
    ffn_mult: int = 2
    input_norm: bool = False
    rotary: bool = False
    eval_batches: int = 4
    eval_every: int = 0
    oracle_position: bool = False
    seed: int = 0


def relevance_probe(
    model: PrunedLlava,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]],
    args: RelevanceProbeArgs,
) -> dict[str, Any]:
    """Trains a DecisionModule on the direct relevance label at ``args.depth`` and scores it on ``val_loader``.

    Returns:
        The settings, ``k``, ``loss_first`` / ``loss_last`` (mean BCE of the first / last 10 % of steps),
        ``history`` (step, loss, recall at each ``eval_every``) and the final :func:`score_relevance` numbers.
    """
    if args.steps < 1:
        raise ValueError(f"probe steps must be >= 1, got {args.steps}")
    if args.k is None or args.k < 1:
        raise ValueError(f"relevance probe k must be >= 1, got {args.k}")
    torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    module = DecisionModule(
        model.dims.hidden_size, args.dim, args.num_blocks, args.num_heads, args.ffn_mult, args.input_norm, args.rotary
    ).to(device)
    t0 = time.perf_counter()
    codes = None
    if args.oracle_position:
        n_max = adapter.vision_dims(model.llava.config).tokens_per_image
        codes = torch.randn(n_max, model.dims.hidden_size, generator=torch.Generator().manual_seed(args.seed))

    def stream(loader, max_batches=None) -> Iterator[Tokens]:
        for t in token_stream(model, loader, args.depth, max_batches):
            yield t if codes is None else with_position_codes(t, codes)

    def evaluate() -> dict[str, float]:
        return score_relevance(module, stream(val_loader, args.eval_batches), args.k)

    train = stream(batches(train_loader))
    losses, history = train_relevance(
        module, train, args.steps, args.lr, args.weight_decay, args.pos_weight, evaluate, args.eval_every
    )
    tail = max(1, len(losses) // 10)
    return {
        **asdict(args),
        "where": depth_name(args.depth),
        "loss_first": sum(losses[:tail]) / tail,
        "loss_last": sum(losses[-tail:]) / tail,
        "history": history,
        **evaluate(),
        "seconds": time.perf_counter() - t0,
    }


def depth_name(depth: int) -> str:
    """``LLM input`` for 0, ``after layer l`` otherwise."""
    return "LLM input" if depth == 0 else f"after layer {depth}"


# ----------------------------------------------------------------------------------- position
def position_features(
    model: PrunedLlava, loader: Iterable[dict[str, Any]], depths: Sequence[int], max_batches: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Vision-token hidden states at each depth and their patch indices.

    Returns:
        ``{depth: (M, D)}`` over the real vision tokens of the first ``max_batches`` batches, and (M,) patch indices.
    """
    feats: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    labels = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        state, hidden = hidden_at_depths(model, batch, depths)
        for d in depths:
            tokens = pack_tokens(state, hidden[d], None)
            feats[d].append(tokens.vision[tokens.vision_valid].cpu())
        labels.append(tokens.patch[tokens.vision_valid].cpu())
    if not labels:
        raise ValueError("the data loader yielded no batches")
    return {d: torch.cat(f) for d, f in feats.items()}, torch.cat(labels)


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, steps: int, lr: float, seed: int = 0
) -> dict[str, float]:
    """Multinomial logistic regression (full batch, Adam) from features to class; train / held-out accuracy.

    Args:
        x: (M, D) training features; y: (M,) classes in [0, C).
        x_val, y_val: held-out features and classes.
    """
    torch.manual_seed(seed)
    n_classes = int(max(y.max(), y_val.max())) + 1
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # standardised features: one lr fits every depth
    norm = lambda t: (t - mean) / std  # noqa: E731
    lin = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr)
    for _ in range(steps):
        loss = F.cross_entropy(lin(norm(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = float((lin(norm(x)).argmax(1) == y).float().mean())
        val_acc = float((lin(norm(x_val)).argmax(1) == y_val).float().mean())
    return {"train_accuracy": train_acc, "accuracy": val_acc, "chance": 1.0 / n_classes, "classes": n_classes}


def position_probe(
    model: PrunedLlava,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]],
    depths: Sequence[int],
    train_batches: int = 6,
    val_batches: int = 2,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per depth: held-out accuracy of a linear patch-index classifier on the vision hidden states."""
    x, y = position_features(model, train_loader, depths, train_batches)
    x_val, y_val = position_features(model, val_loader, depths, val_batches)
    rows = []
    for d in depths:
        res = fit_linear_probe(x[d], y, x_val[d], y_val, steps, lr, seed)
        rows.append({"depth": d, "where": depth_name(d), "n_train": len(y), "n_val": len(y_val), **res})
    return rows


# ------------------------------------------------------------------------------- tables
def default_k(method, n_vision: int) -> int:
    """The last-stage kept count of the method's default schedule, round(rho_last x N) (METHOD §4);
    0.1 (LVPruning's default last ratio) when the config has no method or the method sets its own count."""
    ratios = getattr(method, "keep_ratios", None) or [None]
    ratio = ratios[-1] if ratios[-1] is not None else 0.1
    return int(keep_counts(ratio, torch.tensor([n_vision]), len(ratios) - 1)[0])


def format_relevance(rows: Sequence[dict[str, Any]]) -> str:
    """Table of the relevance probe rows."""
    lines = ["Relevance probe (DecisionModule, direct BCE label, held-out validation questions):"]
    lines.append(
        f"{'point':<14} {'k':>3} {'recall@k':>9} {'all in top-k':>13} {'chance':>7} {'loss first':>11} "
        f"{'loss last':>10} {'steps':>6} {'n':>5}"
    )
    for r in rows:
        lines.append(
            f"{r['where']:<14} {r['k']:>3} {r['recall']:>9.3f} {r['all_in_topk']:>13.3f} {r['chance']:>7.3f} "
            f"{r['loss_first']:>11.4f} {r['loss_last']:>10.4f} {r['steps']:>6} {r['n']:>5}"
        )
    return "\n".join(lines)


def format_position(rows: Sequence[dict[str, Any]]) -> str:
    """Table of the position probe rows."""
    lines = ["Position probe (linear classifier of the patch index, held-out validation images):"]
    lines.append(f"{'depth':<14} {'accuracy':>9} {'train acc':>10} {'chance':>7} {'classes':>8} {'n val':>7}")
    for r in rows:
        lines.append(
            f"{r['where']:<14} {r['accuracy']:>9.3f} {r['train_accuracy']:>10.3f} {r['chance']:>7.3f} "
            f"{r['classes']:>8} {r['n_val']:>7}"
        )
    return "\n".join(lines)
