"""``python -m lightning_lvp flops -c experiments/rho05.yaml [--json]``: TFLOPs per inference schedule."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

from lightning_lvp.commands.experiment import Experiment, run

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


def flops(
    model_config: str | None = None,
    schedules: str | None = None,
    text_tokens: int = 30,
    convention: Literal["alive", "all_vision"] = "alive",
    lm_head: Literal["last", "all", "none"] = "last",
    json: bool = False,
    experiment: Experiment | None = None,
) -> int:
    """FLOPs of the pruned inference forward for 1 image + N text tokens, per inference schedule.

    The model is built without weights from its architecture config (docs/BENCHMARKS.md); the pruning
    method is the config's model.init_args.method.

    Args:
        model_config: LLaVA architecture: a hub id with a shipped config (llava-hf/llava-1.5-7b-hf, no
            download), a config.json or a model folder; default: the config's model.init_args.model_path,
            else llava-hf/llava-1.5-7b-hf.
        schedules: schedules in the common syntax (lightning_lvp/schedules.py): 0.5,0.3,0.1 or paper:0.5 or
            paper:0.3:0.8:0.05, ';' between several; default: the config's RatioSweep callback (schedules,
            else rhos by the paper's rule), else the method's keep_ratios.
        text_tokens: text tokens beside the image (the paper's table: 30).
        convention: pruner FLOPs: alive (what forward_infer runs) or all_vision (every module scores all
            vision tokens, the paper's 0.71 TFLOPs).
        lm_head: positions the LM head is counted on: last (the first generated token), all, none.
        json: print a JSON list (one object per schedule) instead of the table.
    """
    from lightning_lvp import flops as F
    from lightning_lvp.families import family_for
    from lightning_lvp.io import instantiate

    experiment = experiment or Experiment()
    as_json = json
    model = model_config or experiment.model_args().get("model_path") or DEFAULT_MODEL
    method = experiment.method_spec()
    stages = instantiate(method).num_stages if method is not None else None
    if schedules is not None and method is None:
        print("flops: --schedules given but the config names no model.init_args.method to prune with", file=sys.stderr)
        return 2
    try:
        default = None if method is None else ",".join(str(r) for r in instantiate(method).keep_ratios)
        scheds = experiment.schedules(schedules, stages, default=default, allow_base=False)
        rows = F.count_config(F.resolve_model_config(model), method, scheds, text_tokens, lm_head, convention)
    except ValueError as err:  # a bad schedule, a data-dependent one, all_vision without decision modules
        print(f"flops: {err}", file=sys.stderr)
        return 2
    paper = (
        model.lower().rstrip("/") == DEFAULT_MODEL.lower() and text_tokens == 30
    )  # the paper's table is LLaVA-1.5-7B
    described = {**F.CONVENTION, "lm_head": F.LM_HEAD_TEXT[lm_head], "pruners": F.PRUNER_TEXT[convention]}
    described["vision_tower"] = family_for(F.resolve_model_config(model)).vision_tower_flops
    described["input"] = f"{F.describe_input(F.resolve_model_config(model), text_tokens)}; model {model}"
    for r in rows:
        r["paper_tflops"] = F.paper_tflops(r["schedule"]) if paper else None
        r["convention"] = described
    if as_json:
        import json as json_lib

        print(json_lib.dumps(rows, indent=1))
    else:
        print(F.format_table(rows, paper))
        print("\n".join(f"  {k}: {v}" for k, v in described.items()))
    return 0


RENAMED = {
    "--model-config": "--model_config",
    "--text-tokens": "--text_tokens",
    "--lm-head": "--lm_head",
    "--config-file": "-c",
}


def main(argv: Sequence[str]) -> int:
    return run(flops, argv, "python -m lightning_lvp flops", renamed=RENAMED, lists={"--schedules": ";"})
