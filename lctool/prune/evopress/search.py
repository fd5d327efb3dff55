"""EvoPress's evolutionary search (Sieberling et al., 2024): one parent, level-switch offspring,
multi-step selection, elitism.

Each generation:
1. `offspring` distinct mutants of the parent (each meets the target: see `space.mutate`);
2. selection in steps: every candidate still in the race is scored on a fresh random sample of the
   step's calibration windows and only the best `survivors[step]` go on, so most offspring are
   judged on few tokens and only the promising ones on many; the parent joins at the last step
   (elitism: it is replaced only by an offspring that beats it on the same tokens);
3. the last step's single survivor is the next parent.

Fitness is any function (configuration, calibration window indices) -> float, lower is better
(here: KL divergence to the dense model).

Everything random comes from one `random.Random(seed)`; its state is saved with the parent in a JSON
state file after every generation (written atomically), so a run interrupted at any point continues
from the last finished generation and ends exactly where an uninterrupted run with the same seed does.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from lctool.errors import LctoolError, check
from lctool.prune.evopress.space import Config, SearchSpace, can_mutate, mutate, random_config

Fitness = Callable[[Config, list[int]], float]
STATE_VERSION = 1


@dataclass(frozen=True)
class SearchPlan:
    generations: int
    offspring: int
    stage_windows: list[int]  # calibration windows scored at each selection step
    survivors: list[int]  # candidates kept after each step (the last is 1)
    max_switches: int
    initial_candidates: int
    num_windows: int  # calibration windows available
    seed: int


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def _write_state(path: str, state: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.write("\n")
    os.replace(tmp, path)


def load_state(path: str, fingerprint: dict) -> dict | None:
    """The saved state of this very search, None when there is none; a one-line error for another search's."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise LctoolError(f"--state {path} cannot be read ({type(e).__name__}); remove it to start over") from None
    check(isinstance(state, dict) and state.get("version") == STATE_VERSION, f"--state {path} is not an EvoPress state file")
    if state.get("fingerprint") != fingerprint:
        have = state.get("fingerprint") or {}
        changed = sorted(k for k in set(have) | set(fingerprint) if have.get(k) != fingerprint.get(k))
        raise LctoolError(f"--state {path} belongs to another search ({', '.join(changed[:3])} differ); "
                          "remove it or give another --state")
    return state


class Search:
    """One search over `space`; `run()` returns the final state (parent, fitness, history)."""

    def __init__(self, space: SearchSpace, fitness: Fitness, plan: SearchPlan, state_path: str | None,
                 fingerprint: dict, log: Callable[[str], None] = lambda _: None,
                 on_generation: Callable[[dict], None] | None = None):
        check(all(w <= plan.num_windows for w in plan.stage_windows),
              f"a selection step needs more calibration windows than the {plan.num_windows} there are")
        self.space, self.fitness, self.plan = space, fitness, plan
        self.state_path, self.fingerprint = state_path, fingerprint
        self.log = log
        self.on_generation = on_generation

    # ---- selection -----------------------------------------------------------------------------
    def _score(self, candidates: list[Config], windows: int, rng: random.Random, counter: list[int]) -> list[float]:
        sample = sorted(rng.sample(range(self.plan.num_windows), windows))
        scores = []
        for candidate in candidates:
            scores.append(float(self.fitness(candidate, sample)))
            counter[0] += 1
        return scores

    def _select(self, candidates: list[Config], parent: Config | None, rng: random.Random,
                counter: list[int]) -> tuple[Config, float]:
        """Multi-step selection; the parent (if any) joins at the last step."""
        plan = self.plan
        alive = list(candidates)
        best_score = float("nan")
        for step, (windows, keep) in enumerate(zip(plan.stage_windows, plan.survivors, strict=True)):
            last = step == len(plan.survivors) - 1
            if last and parent is not None and parent not in alive:
                alive.append(parent)
            if len(alive) <= keep and not last:
                continue
            scores = self._score(alive, windows, rng, counter)
            order = sorted(range(len(alive)), key=lambda i: (scores[i], i))[:keep]
            alive = [alive[i] for i in order]
            best_score = scores[order[0]]
        return alive[0], best_score

    def _offspring(self, parent: Config, rng: random.Random) -> list[Config]:
        children: list[Config] = []
        attempts = 0
        while len(children) < self.plan.offspring and attempts < 50 * self.plan.offspring:
            attempts += 1
            child = mutate(self.space, parent, rng, self.plan.max_switches)
            if child != parent and child not in children:
                children.append(child)
        return children

    # ---- the run -------------------------------------------------------------------------------
    def _initial_state(self) -> dict:
        rng = random.Random(self.plan.seed)
        starts: list[Config] = []
        for _ in range(self.plan.initial_candidates):
            config = random_config(self.space, rng)
            if config not in starts:
                starts.append(config)
        counter = [0]
        began = time.time()
        parent, score = self._select(starts, None, rng, counter)
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "generation": 0,
            "parent": list(parent),
            "fitness": score,
            "initial": list(parent),
            "evaluated": counter[0],
            "search_s": round(time.time() - began, 3),
            "history": [{"generation": 0, "fitness": score, "evaluated": counter[0], "candidates": len(starts)}],
            "rng": _rng_to_json(rng),
        }
        self.log(f"evopress: start from the best of {len(starts)} target-meeting configuration(s), fitness {score:.5g}")
        return state

    def run(self) -> dict:
        state = load_state(self.state_path, self.fingerprint) if self.state_path else None
        if state is None:
            state = self._initial_state()
            self._save(state)
        elif state["generation"] > self.plan.generations:
            raise LctoolError(f"--state {self.state_path} already holds {state['generation']} generations, more than "
                              f"--generations {self.plan.generations}; remove it or give another --state")
        elif state["generation"]:
            self.log(f"evopress: resuming after generation {state['generation']} from {self.state_path}")
        rng = _rng_from_json(state["rng"])
        parent = tuple(state["parent"])
        if not can_mutate(self.space, parent) and state["generation"] < self.plan.generations:
            self.log("evopress: every configuration meeting the target is this one: nothing to search")
            return state
        while state["generation"] < self.plan.generations:
            began = time.time()
            counter = [0]
            children = self._offspring(parent, rng)
            parent, score = self._select(children, parent, rng, counter)
            generation = state["generation"] + 1
            seconds = time.time() - began
            state.update(generation=generation, parent=list(parent), fitness=score, rng=_rng_to_json(rng),
                         evaluated=state["evaluated"] + counter[0], search_s=round(state["search_s"] + seconds, 3))
            record = {"generation": generation, "fitness": score, "evaluated": counter[0], "candidates": len(children),
                      "seconds": round(seconds, 3)}
            state["history"].append(record)
            self._save(state)
            self.log(f"evopress: generation {generation}/{self.plan.generations}: best fitness {score:.5g} "
                     f"({counter[0]} evaluations of {len(children)} offspring + parent, {seconds:.1f} s)")
            if self.on_generation is not None:
                self.on_generation(record)
        return state

    def _save(self, state: dict) -> None:
        if self.state_path:
            _write_state(self.state_path, state)
