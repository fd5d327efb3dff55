"""The search space: compressible units, their levels, and the exact target every configuration meets.

A configuration gives each unit a level index (0 .. K-1) into the space's evenly spaced level values
(sparsities, bitwidths, or kept/dropped for blocks). Units of the same size form a group, and each
group must hold a fixed sum of level indices. Because the levels are evenly spaced, that fixes the
group's (and so the whole model's) size-weighted average level exactly, in integer arithmetic:

    average = v0 + step · Σ_g size_g · S_g / Σ_g size_g · n_g,   S_g = the group's index sum.

The target is met group by group: the target average times a group's unit count must be a whole
number of level steps. Mutation moves one unit of a group one level up and another unit of the same
group one level down (the paper's level-switch mutation), which keeps every group sum, so every
configuration the search ever produces meets the target exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from lctool.errors import LctoolError, check

Config = tuple[int, ...]


def exact(value: float | str | Fraction) -> Fraction:
    """A level or target as the exact decimal it was written as (0.1 is 1/10, not the nearest double)."""
    return value if isinstance(value, Fraction) else Fraction(str(value))


def level_step(levels: list[Fraction]) -> Fraction:
    """The common spacing of evenly spaced, strictly increasing levels."""
    check(len(levels) >= 2, "give at least two levels to choose from")
    step = levels[1] - levels[0]
    check(step > 0 and all(b - a == step for a, b in zip(levels, levels[1:], strict=False)),
          f"levels must be strictly increasing and evenly spaced (level switches then keep the average exact), "
          f"got {', '.join(str(float(v)) for v in levels)}")
    return step


@dataclass(frozen=True)
class SearchSpace:
    units: tuple[str, ...]  # unit names (module paths, or attn.i / mlp.i / layer.i for blocks)
    sizes: tuple[int, ...]  # parameters per unit: the weight of its level in the average
    levels: tuple[Fraction, ...]  # level values, evenly spaced, increasing
    groups: tuple[tuple[int, ...], ...]  # unit indices that trade levels with each other
    group_sums: tuple[int, ...]  # the level-index sum each group holds

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def value(self, config: Config, unit: int) -> Fraction:
        return self.levels[config[unit]]

    def average(self, config: Config) -> Fraction:
        """Size-weighted average level value, exactly."""
        total = sum(self.sizes)
        return sum((self.levels[i] * s for i, s in zip(config, self.sizes, strict=True)), Fraction(0)) / total

    def meets_target(self, config: Config) -> bool:
        if len(config) != len(self.units) or not all(0 <= i < self.num_levels for i in config):
            return False
        return all(sum(config[u] for u in group) == want for group, want in zip(self.groups, self.group_sums,
                                                                                   strict=True))


def build_space(units: list[str], sizes: list[int], levels: list[Fraction], target: Fraction,
                groups: list[list[int]] | None = None) -> SearchSpace:
    """A space whose every group averages exactly `target` (groups default to units of equal size).

    Raises a one-line LctoolError when the target cannot be met exactly.
    """
    step = level_step(levels)
    low, high = levels[0], levels[-1]
    check(low <= target <= high, f"unreachable target {float(target):g}: the levels span {float(low):g} .. {float(high):g}")
    if groups is None:
        by_size: dict[int, list[int]] = {}
        for index, size in enumerate(sizes):
            by_size.setdefault(size, []).append(index)
        groups = list(by_size.values())
    per_unit = (target - low) / step  # level steps per unit, as a fraction
    sums = []
    for group in groups:
        steps = per_unit * len(group)
        if steps.denominator != 1:
            example = f"{units[group[0]]} and {len(group) - 1} more" if len(group) > 1 else units[group[0]]
            raise LctoolError(
                f"unreachable target {float(target):g}: the {len(group)} units of size {sizes[group[0]]:,} "
                f"({example}) cannot average it exactly with levels spaced {float(step):g}")
        sums.append(int(steps))
    return SearchSpace(tuple(units), tuple(sizes), tuple(levels), tuple(tuple(g) for g in groups), tuple(sums))


def random_config(space: SearchSpace, rng: random.Random) -> Config:
    """A configuration meeting the target: each group as even as possible, the remainder on random units."""
    config = [0] * len(space.units)
    for group, total in zip(space.groups, space.group_sums, strict=True):
        base, extra = divmod(total, len(group))
        for unit in group:
            config[unit] = base
        for unit in rng.sample(list(group), extra):
            config[unit] += 1
    return tuple(config)


def _movers(space: SearchSpace, config: list[int] | Config, group: tuple[int, ...]):
    """(units that can move down a level, units that can move up), or None when no two distinct units trade."""
    top = space.num_levels - 1
    downs = [u for u in group if config[u] > 0]
    ups = [u for u in group if config[u] < top]
    if not downs or not ups or (len(downs) == 1 and downs == ups):
        return None
    return downs, ups


def _switch_pair(space: SearchSpace, config: list[int], group: tuple[int, ...], rng: random.Random):
    """(unit to move down a level, another unit of the group to move up); the group must be able to trade."""
    downs, ups = _movers(space, config, group)
    down = rng.choice(downs)
    others = [u for u in ups if u != down]
    if not others:  # `down` is the only unit that could move up: pick the down-mover among the rest
        up = down
        down = rng.choice([u for u in downs if u != up])
        return down, up
    return down, rng.choice(others)


def mutate(space: SearchSpace, config: Config, rng: random.Random, max_switches: int = 3) -> Config:
    """An offspring: 1..max_switches level switches (fewer more likely, as in the paper), target kept."""
    child = list(config)
    switches = min(rng.randint(1, max_switches), rng.randint(1, max_switches))
    for _ in range(switches):
        movable = [g for g in space.groups if _movers(space, child, g) is not None]
        if not movable:
            break
        group = rng.choices(movable, weights=[len(g) for g in movable])[0]
        down, up = _switch_pair(space, child, group, rng)
        child[down] -= 1
        child[up] += 1
    return tuple(child)


def can_mutate(space: SearchSpace, config: Config) -> bool:
    return any(_movers(space, config, g) is not None for g in space.groups)
