"""Inference schedules: the paper's rule, its one clip policy, and the one syntax every command reads.

A *schedule* is the kept fraction of the ORIGINAL vision tokens at each pruning point (stage),
e.g. ``[0.5, 0.3, 0.1]`` for modules after LLM layers 1, 8 and 16 (METHOD §2, §4). ``None`` in
place of a schedule is the unpruned model; ``None`` in place of a ratio lets the method choose
its own count at that stage (CLS-knee).

Syntax (``SPEC``, accepted by every command that takes schedules)::

    0.5,0.3,0.1            one explicit schedule, one ratio per stage ("auto": the method decides)
    paper:0.5              the paper's rule [rho, rho - 0.2, rho - 0.4, ...] for the method's stages
    paper:0.6,0.5,0.45     the rule for several rhos (one schedule each)
    paper:0.3:0.8:0.05     the rule for a range of rhos START:STOP:STEP (STOP included)
    base                   the unpruned model
    A;B;C                  several of the above, evaluated in this order

for example ``"base;paper:0.6,0.5,0.45;0.5,0.4,0.3"``. Brackets and spaces are ignored, so a
printed ``[0.5, 0.3, 0.1]`` can be pasted back. ``","`` separates stages (or rhos), ``";"``
separates schedules.

Clip policy (the only one): the paper's rule never goes below ``min_ratio`` (default
:data:`MIN_RATIO`, 0.05): stage s keeps ``max(min_ratio, rho - s * step)``; rho must be in
(0, 1]. Explicit ratios are never clipped; they must be in (0, 1] and non-increasing.

Pure Python (no torch, no transformers): commands and plugins import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

PAPER_STEP = 0.2  # METHOD §2: rho, rho - 0.2, rho - 0.4
PAPER_RHOS = (0.6, 0.5, 0.45)  # the paper's three operating points (Table 1)
MIN_RATIO = 0.05  # floor of the paper's rule (rho 0.45 -> [0.45, 0.25, 0.05] reaches it exactly)
BASE = "base"
AUTO = "auto"

Schedule = list[float | None]


def validate_ratios(ratios: Sequence[float | None], field: str, allow_none: bool = False) -> list[float | None]:
    """Checks kept ratios are in (0, 1] and non-increasing; error messages name ``field``.

    Args:
        ratios: one schedule.
        field: the flag or argument the ratios came from (for the message).
        allow_none: accept ``None`` entries (the method decides that stage's count).
    """
    ratios = list(ratios)
    numeric = []
    for r in ratios:
        if r is None:
            if not allow_none:
                raise ValueError(f"{field} must be numbers in (0, 1], got {ratios}")
            continue
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise ValueError(f"{field} must be in (0, 1], got {ratios}")
        numeric.append(float(r))
    if any(b > a + 1e-12 for a, b in zip(numeric, numeric[1:])):
        raise ValueError(f"{field} must be non-increasing, got {ratios}")
    return ratios


def paper_schedule(rho: float, stages: int, step: float = PAPER_STEP, min_ratio: float = MIN_RATIO) -> list[float]:
    """The paper's rule: ``[rho, rho - step, rho - 2 step, ...]`` for ``stages`` stages, floored at ``min_ratio``.

    Args:
        rho: first-stage kept ratio, in (0, 1].
        stages: number of pruning points of the method.
        step: decrease per stage (METHOD §2: 0.2).
        min_ratio: floor of every stage (the one clip policy), in (0, 1].

    Returns:
        ``stages`` ratios, rounded to 6 decimals (no float noise in names and JSON).
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if step < 0:
        raise ValueError(f"the per-stage step must be >= 0, got {step}")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    return [round(max(min_ratio, rho - step * s), 6) for s in range(stages)]


def paper_schedules(
    rhos: Sequence[float], stages: int, step: float = PAPER_STEP, min_ratio: float = MIN_RATIO
) -> list[list[float]]:
    """:func:`paper_schedule` of each rho."""
    return [paper_schedule(float(r), stages, step, min_ratio) for r in rhos]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be numbers separated by ',', got {text!r}") from err


def parse_rhos(text: str) -> list[float]:
    """``"0.5"`` -> [0.5]; ``"0.6,0.5"`` -> [0.6, 0.5]; ``"0.3:0.4:0.05"`` -> [0.3, 0.35, 0.4] (inclusive)."""
    text = text.strip()
    if ":" not in text:
        rhos = _floats(text, "rhos")
        if not rhos:
            raise ValueError("no rho given (e.g. paper:0.5, paper:0.6,0.5 or paper:0.3:0.8:0.05)")
        return rhos
    parts = _floats(text.replace(":", ","), "a rho range")
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise ValueError(f"a rho range is START:STOP:STEP with STOP >= START and STEP > 0, got {text!r}")
    start, stop, step = parts
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(n)]


def _explicit(text: str, stages: int | None) -> Schedule:
    ratios: Schedule = [None if x.strip() == AUTO else float(x) for x in text.split(",") if x.strip()]
    if not ratios:
        raise ValueError(f"empty schedule in {text!r}")
    if stages is not None and len(ratios) != stages:
        raise ValueError(f"schedule {text!r} has {len(ratios)} ratios, the method has {stages} stages")
    return validate_ratios(ratios, f"schedule {text!r}", allow_none=True)


def parse_schedules(
    spec: str,
    stages: int | None = None,
    step: float = PAPER_STEP,
    min_ratio: float = MIN_RATIO,
    allow_base: bool = True,
) -> list[Schedule | None]:
    """Parses a ``SPEC`` (module docstring) into schedules; ``None`` stands for ``base``.

    Args:
        spec: e.g. ``"0.5,0.3,0.1"``, ``"paper:0.3:0.8:0.05"``, ``"base;paper:0.5;0.6,0.4,0.2"``.
        stages: the method's stage count; required by ``paper:`` and checked against explicit ones.
        step, min_ratio: the paper rule's step and floor.
        allow_base: accept ``base`` (commands that always include the unpruned model pass False).

    Raises:
        ValueError: with the offending part and what is allowed.
    """
    out: list[Schedule | None] = []
    clean = spec.replace("[", "").replace("]", "").replace(" ", "")
    for part in (p for p in clean.split(";") if p):
        if part == BASE:
            if not allow_base:
                raise ValueError(f"'base' is not accepted here (the unpruned model is always included): {spec!r}")
            out.append(None)
        elif part.startswith("paper:"):
            if stages is None:
                raise ValueError(f"{part!r} needs the method's stage count; give explicit ratios instead")
            out += paper_schedules(parse_rhos(part[len("paper:") :]), stages, step, min_ratio)
        else:
            try:
                out.append(_explicit(part, stages))
            except ValueError as err:
                if any(c.isalpha() for c in part.replace(AUTO, "")):
                    raise ValueError(
                        f"cannot read schedule {part!r}: use 0.5,0.3,0.1 | paper:RHO[,RHO...] | "
                        "paper:START:STOP:STEP | base, separated by ';'"
                    ) from err
                raise
    if not out:
        raise ValueError(f"no schedule in {spec!r}")
    return out


def parse_schedule(spec: str, stages: int | None = None, step: float = PAPER_STEP, min_ratio: float = MIN_RATIO):
    """Exactly one schedule (``base`` -> None), for commands that run one schedule."""
    found = parse_schedules(spec, stages, step, min_ratio)
    if len(found) != 1:
        raise ValueError(f"expected one schedule, {spec!r} gives {len(found)}")
    return found[0]


def format_schedule(ratios: Sequence[float | None] | None) -> str:
    """The inverse of :func:`parse_schedule`: ``[0.5, 0.3, 0.1]`` -> ``"0.5,0.3,0.1"``, None -> ``"base"``."""
    if ratios is None:
        return BASE
    return ",".join(AUTO if r is None else f"{r:g}" for r in ratios)
