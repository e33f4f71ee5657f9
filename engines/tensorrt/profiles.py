"""TensorRT optimisation profiles from a BucketPlan: the (batch, seq) range each input accepts.

A profile is a box: every shape between `min` and `max` runs, and kernels are tuned for `opt`.
Unlike CUDA graphs, TensorRT needs no profile per bucket; one box covering the plan is enough,
with `opt` at the shape traffic actually has (short queries, mid-sized micro-batches).
Pure logic: no tensorrt import, so it is tested on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engines.buckets import BucketPlan
from engines.export import INPUT_NAMES

DEFAULT_OPT_BATCH = 32
DEFAULT_OPT_LENGTH = 64

Shape = tuple[int, int]  # (batch, seq)


@dataclass(frozen=True, slots=True)
class ProfileShapes:
    """min <= opt <= max in both dims, every dim >= 1 (what IOptimizationProfile accepts)."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        for label, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if len(shape) != 2 or any(int(d) < 1 for d in shape):
                raise ValueError(f"profile {label} shape {shape} must be two dims >= 1 "
                                 "(batch, seq)")
        for axis, dim in enumerate(("batch", "seq")):
            if not self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise ValueError(f"profile {dim} range is impossible: min {self.min[axis]}, "
                                 f"opt {self.opt[axis]}, max {self.max[axis]} (need "
                                 "min <= opt <= max)")

    def contains(self, batch: int, length: int) -> bool:
        return (self.min[0] <= batch <= self.max[0]) and (self.min[1] <= length <= self.max[1])

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def plan_profile(plan: BucketPlan, *, opt_batch: int = DEFAULT_OPT_BATCH,
                 opt_length: int = DEFAULT_OPT_LENGTH) -> ProfileShapes:
    """One box over the whole plan: (1, 1) to (max batch, max length), opt clamped into it."""
    if opt_batch < 1 or opt_length < 1:
        raise ValueError(f"opt shape ({opt_batch}, {opt_length}) must be >= 1 in both dims")
    top = (plan.max_batch, plan.max_length)
    return ProfileShapes(min=(1, 1), opt=(min(opt_batch, top[0]), min(opt_length, top[1])),
                         max=top)


def fixed_profile(batch: int, length: int) -> ProfileShapes:
    """min = opt = max: the calibration profile. Without one TensorRT calibrates at the first
    profile's opt shape and expects every calibration batch to have exactly that shape."""
    return ProfileShapes((batch, length), (batch, length), (batch, length))


def input_profile(plan: BucketPlan, names: Sequence[str] = INPUT_NAMES,
                  **opt: int) -> dict[str, ProfileShapes]:
    """The same (batch, seq) box for every model input: they are all [batch, seq] arrays."""
    if not names:
        raise ValueError("a profile needs at least one input name")
    if unknown := sorted(set(names) - set(INPUT_NAMES)):
        raise ValueError(f"inputs {unknown} are not BERT inputs {INPUT_NAMES}; the export "
                         "contract (engines.export) changed?")
    shapes = plan_profile(plan, **opt)
    return {name: shapes for name in names}


def profiles_for_contexts(plan: BucketPlan, contexts: int = 2,
                          names: Sequence[str] = INPUT_NAMES,
                          **opt: int) -> list[dict[str, ProfileShapes]]:
    """One identical profile per execution context, in profile-index order.

    With dynamic shapes TensorRT lets one profile be used by only one execution context at a
    time, so two contexts running at once on their own streams need two profile indices. A
    plan served by N lanes is therefore built with N copies of the same profile; lane i's
    context selects profile i.
    """
    if contexts < 1:
        raise ValueError(f"contexts must be >= 1, got {contexts}")
    one = input_profile(plan, names, **opt)
    return [dict(one) for _ in range(contexts)]
