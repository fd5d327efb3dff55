"""Which elements torch's CPU sort puts at positions [low, high), found in O(n) instead of O(n log n).

mergekit's TIES and breadcrumbs keep `argsort(|delta|)[low:high]`. Among equal magnitudes at a cut, the
choice depends on the exact (unstable) sort torch runs: on CPU, for float32 and a contiguous last
dimension, that is libstdc++'s `std::sort` (introsort) on (value, index) pairs with torch's NaN-aware
comparator — checked against torch.argsort on every call path by tests/test_merge_methods.py.

An introsort never moves an element out of the range it was partitioned into, and its final insertion
sort only reorders elements within the ≤ 16-element leaves. So the members of positions [low, high) are
decided by the partition steps on the ranges that hold `low` or `high` strictly inside: replaying those
steps (same median-of-three pivot, same Hoare partition, same depth limit) and skipping every range that
lies wholly inside or outside the cut gives the sort's own choice at about 2n comparisons. When the
depth limit would switch the sort to heapsort, the replay gives up and the caller runs the real sort.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

LEAF = 16  # libstdc++'s _S_threshold: introsort leaves ranges this small to the final insertion sort
_STACK = 256  # ranges waiting to be replayed; each level adds at most 2 of the (at most 2) open ranges


@njit(nogil=True, cache=True)
def _swap(values, order, a, b):
    values[a], values[b] = values[b], values[a]
    order[a], order[b] = order[b], order[a]


@njit(nogil=True, cache=True)
def _move_median_to_first(values, order, result, a, b, c):
    # Descending comparator: "x before y" is x > y (no NaN reaches here).
    if values[a] > values[b]:
        if values[b] > values[c]:
            _swap(values, order, result, b)
        elif values[a] > values[c]:
            _swap(values, order, result, c)
        else:
            _swap(values, order, result, a)
    elif values[a] > values[c]:
        _swap(values, order, result, a)
    elif values[b] > values[c]:
        _swap(values, order, result, c)
    else:
        _swap(values, order, result, b)


@njit(nogil=True, cache=True)
def _partition(values, order, first, last):
    """libstdc++'s __unguarded_partition_pivot on [first, last); returns the cut."""
    _move_median_to_first(values, order, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = values[first]
    left, right = first + 1, last
    while True:
        while values[left] > pivot:
            left += 1
        right -= 1
        while pivot > values[right]:
            right -= 1
        if not left < right:
            return left
        _swap(values, order, left, right)
        left += 1


@njit(nogil=True, cache=True)
def _sort_leaf(values, order, first, last):
    """The final insertion sort, which is stable, restricted to one leaf."""
    for i in range(first + 1, last):
        value, index = values[i], order[i]
        j = i
        while j > first and value > values[j - 1]:
            values[j] = values[j - 1]
            order[j] = order[j - 1]
            j -= 1
        values[j] = value
        order[j] = index


@njit(nogil=True, cache=True)
def _mark(keep, order, first, last):
    for i in range(first, last):
        keep[order[i]] = True


@njit(nogil=True, cache=True)
def _replay(values, order, low, high, depth_limit, keep):
    """Mark in `keep` the original indices that a descending std::sort of `values` puts at [low, high).

    `values` and `order` (0..n-1 on entry) are permuted in place as the sort would. Returns False if
    the sort would fall back to heapsort on a range that matters."""
    n = values.shape[0]
    firsts = np.empty(_STACK, np.int64)
    lasts = np.empty(_STACK, np.int64)
    depths = np.empty(_STACK, np.int64)
    firsts[0], lasts[0], depths[0] = 0, n, depth_limit
    top = 1
    while top:
        top -= 1
        first, last, depth = firsts[top], lasts[top], depths[top]
        if last - first <= LEAF:
            _sort_leaf(values, order, first, last)
            _mark(keep, order, max(first, low), min(last, high))
            continue
        if depth == 0:
            return False
        cut = _partition(values, order, first, last)
        for a, b in ((first, cut), (cut, last)):
            if b <= low or a >= high:
                continue
            if low <= a and b <= high:
                _mark(keep, order, a, b)
                continue
            firsts[top], lasts[top], depths[top] = a, b, depth - 1
            top += 1
    return True


def introsort_depth_limit(n: int) -> int:
    """std::sort's recursion budget, 2·floor(log2 n), before it switches a range to heapsort."""
    return 2 * (n.bit_length() - 1)


def sorted_slice_mask(values: torch.Tensor, low: int, high: int, descending: bool, *, scratch: bool = False) -> torch.Tensor:
    """A bool mask (shape of the flattened `values`) of `torch.sort(values, descending).indices[low:high]`.

    `values` is a 1-D float32 CPU tensor, as mergekit sorts. Bit-for-bit the same set as torch's own
    sort for every input; NaNs and the rare heapsort fallback run torch's sort itself. With `scratch`
    the caller gives up `values`: it is permuted (and negated) in place instead of copied.
    """
    n = values.numel()
    low, high = max(0, low), min(n, high)
    keep = torch.zeros(n, dtype=torch.bool)
    if low >= high:
        return keep
    if values.dtype != torch.float32 or values.device.type != "cpu" or values.isnan().any():
        keep[torch.sort(values, descending=descending).indices[low:high]] = True
        return keep
    work = values if scratch else values.clone()
    if not descending:
        # An ascending sort makes exactly the comparisons of a descending sort of the negated values.
        work.neg_()
    order = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64)
    if _replay(work.numpy(), order.numpy(), low, high, introsort_depth_limit(n), keep.numpy()):
        return keep
    # Heapsort territory: undo the replay's permutation and let torch sort the original order.
    original = torch.empty_like(work)
    original[order.long()] = work if descending else work.neg_()
    keep.zero_()
    keep[torch.sort(original, descending=descending).indices[low:high]] = True
    return keep
