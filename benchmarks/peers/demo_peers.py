"""The peer methods (VisionZip, DivPrune, DART, PyramidDrop; FastV for reference) on the demo base.

Same rows as ``python -m lightning_lvp compare`` adds for the peers, without the LVPruning rows (no
pruner checkpoint needed): each peer at the share 64 / 128 / 192 of 576 of the vision tokens
(4 / 8 / 12 of the demo's 36), teacher-forced accuracy on the digits validation set and TFLOPs per
sample under the shared convention (:mod:`lightning_lvp.flops`). Writes ``peers.{md,json,png}``.

    python benchmarks/peers/demo_peers.py --model assets/demo_base --data experiments/demo.yaml --out outputs/peers
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from lightning_lvp import adapter
from lightning_lvp.commands.compare import validation_loader
from lightning_lvp.commands.experiment import Experiment
from lightning_lvp.compare import Entry, evaluate_entry, markdown_table, plot_accuracy_vs_tflops, single_samples
from lightning_lvp.methods import FastV
from lightning_lvp.methods.peers import PAPER_TOKENS, peer_entries


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/demo_base")
    p.add_argument("--data", default="experiments/demo.yaml")
    p.add_argument("--cache_dir", "--cache-dir", default=".cache")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None)
    p.add_argument("--num_workers", "--num-workers", type=int, default=0)
    p.add_argument("--max_batches", "--max-batches", type=int, default=None)
    p.add_argument("--flops_samples", "--flops-samples", type=int, default=4)
    p.add_argument("--out", default="outputs/peers")
    args = p.parse_args(argv)
    llava = adapter.load_llava(args.model)
    experiment = Experiment.load(args.data) if args.data else Experiment()
    loader = validation_loader(experiment, args.model, args.cache_dir, args.batch_size, args.num_workers)
    samples = single_samples(loader, args.flops_samples)
    num_layers = adapter.text_dims(llava.config).num_layers
    n_vision = adapter.vision_dims(llava.config).tokens_per_image
    entries = [Entry("base", None, None)]
    for t in PAPER_TOKENS:  # FastV at the same kept share, for reference
        r = round(max(t / 576, 1 / n_vision), 6)
        entries.append(Entry(f"fastv_{t}", FastV(k=2, keep_ratio=r), [r]))
    entries += [Entry(*row) for row in peer_entries(num_layers, n_vision)]
    rows, start = [], time.time()
    for entry in entries:
        print(f"evaluating {entry.name} {entry.ratios}", flush=True)
        rows.append(evaluate_entry(llava, entry, loader, samples, num_layers, args.max_batches))
    base = rows[0]["tflops"]
    for row in rows:
        row["flops_change"] = row["tflops"] / base - 1.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/peers/demo_peers.py " + shlex.join(argv)
    (out / "peers.json").write_text(
        json.dumps({"command": command, "seconds": time.time() - start, "rows": rows}, indent=1)
    )
    (out / "peers.md").write_text(markdown_table(rows) + f"\n\nCommand: `{command}`\n")
    plot_accuracy_vs_tflops(rows, out / "peers.png")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
