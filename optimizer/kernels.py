"""Compiled kernels of the exact solver (optimizer/exact.py): the same steps as its numpy code,
as loops, so that the first solve of a fresh table (a new services tuple or a new RTT) is one
call instead of a few dozen small numpy ones. Every floating-point operation is the numpy
path's, in the same order, so critical bandwidths, sums and choices come out bit for bit the
same (tests/test_exact_kernels.py checks both paths against each other and against brute force).
The cell solver (optimizer/cell.py) uses the same style for its per-row frontiers and hulls.

`solve_fresh` works in two scratch arrays the caller keeps, addressed by offsets rather than
slices: a solve runs between other work (the car's perception, other cars' solves), so its
cost is mostly cache misses, and fresh allocations and slice bookkeeping add code and memory
to miss on.

Compiled on first use and cached on disk (`cache=True`), so only the first process pays.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Sorting: runs of this many entries by insertion (fastest when short), then merges.
_INSERTION_RUN = 16


def scratch_sizes(service_count: int, width: int, max_combinations: int) -> tuple[int, int]:
    """Lengths of the float and integer scratch arrays `solve_fresh` needs (layouts there)."""
    cells = service_count * width
    return service_count + 2 * cells + 7 * max_combinations + 1, 4 * service_count + cells + 1 + 2 * max_combinations


@njit(cache=True)
def solve_fresh(sizes_mbit, slack_runtimes_ms, utilities, weights, rtt_ms, slo_ms, limit_mbps, search_limit_mbps,
                max_combinations, floats, integers):
    """The first solve of a fresh table: the frontiers (`frontier_table`), then
    `exact.meet_in_the_middle`. True when done, with the optimal option index per service in
    integers[:services] and its critical bandwidth in floats[:services]; False when a half has
    more than `max_combinations` combinations (use the DP). `search_limit_mbps` is the limit
    less the hair that keeps every accepted pair's sum within it.

    Scratch layout (`scratch_sizes` long), services S, cells C = S x width:
    floats:   chosen costs [S] | frontier costs [C] | frontier values [C] | combinations
    integers: chosen options [S] | frontier options [C] | starts [S + 1] | within [S] |
              chosen points [S] | combination order and merge buffer"""
    service_count, width = sizes_mbit.shape
    cells = service_count * width
    costs_at = service_count
    values_at = costs_at + cells
    options_at = service_count
    starts_at = options_at + cells
    within_at = starts_at + service_count + 1
    points_at = within_at + service_count
    _fill_frontier_table(sizes_mbit, slack_runtimes_ms, utilities, weights, rtt_ms, slo_ms,
                         floats, costs_at, values_at, integers, options_at, starts_at)
    if not _meet_in_the_middle(floats, costs_at, values_at, integers, starts_at, service_count, limit_mbps,
                               search_limit_mbps, max_combinations, within_at, points_at, values_at + cells,
                               points_at + service_count):
        return False
    for service in range(service_count):
        point = integers[points_at + service]
        integers[service] = integers[options_at + point]
        floats[service] = floats[costs_at + point]
    return True


@njit(cache=True)
def frontier_table(sizes_mbit, slack_runtimes_ms, utilities, weights, rtt_ms, slo_ms):
    """Every service's Pareto frontier, concatenated in service order, from the padded
    (service x option) tables of `ProblemArrays` (values are weighted utilities):
    (costs, values, option_indices, starts), service s owning [starts[s], starts[s + 1]).
    The same points, in the same order, as `exact.build_frontier_table`."""
    service_count, width = sizes_mbit.shape
    cells = service_count * width
    floats = np.empty(2 * cells)
    integers = np.empty(cells + service_count + 1, dtype=np.int64)
    point_count = _fill_frontier_table(sizes_mbit, slack_runtimes_ms, utilities, weights, rtt_ms, slo_ms,
                                       floats, 0, cells, integers, 0, cells)
    return (floats[:point_count].copy(), floats[cells:cells + point_count].copy(),
            integers[:point_count].copy(), integers[cells:].copy())


@njit(cache=True)
def _fill_frontier_table(sizes_mbit, slack_runtimes_ms, utilities, weights, rtt_ms, slo_ms,
                         floats, costs_at, values_at, integers, options_at, starts_at):
    """`frontier_table` into the scratch arrays at these offsets; returns the number of points.

    `exact.build_frontier_table` sorts each row by `_precedes` and keeps an option iff no option
    before it (table order on full ties) is at least as useful. Here the options are taken in
    table order instead, each against the frontier of those before it (a handful of points):
    the same points, no sort."""
    service_count, width = sizes_mbit.shape
    point = 0  # points so far, all rows
    for service in range(service_count):
        integers[starts_at + service] = point
        row_start = point  # this row's frontier so far: [row_start, point), cost and value rising
        for option in range(width):
            # The arithmetic of `ProblemArrays.critical_bandwidths_mbps`, step by step.
            slack_s = slo_ms - slack_runtimes_ms[service, option]
            slack_s -= rtt_ms
            slack_s /= 1000.0
            if not slack_s > 0:
                continue
            cost = sizes_mbit[service, option] / slack_s
            if not cost < math.inf:
                continue
            value = utilities[service, option] * weights[service]
            # The most useful frontier point at most as costly: does it dominate this option?
            # (On a full tie the earlier option, already on the frontier, wins.)
            cheaper_end = row_start
            while cheaper_end < point and floats[costs_at + cheaper_end] <= cost:
                cheaper_end += 1
            if cheaper_end > row_start and floats[values_at + cheaper_end - 1] >= value:
                continue
            # This option replaces an equally costly, less useful point and the costlier points
            # it is at least as useful as (a contiguous run: values rise along the frontier).
            first_replaced = cheaper_end
            if cheaper_end > row_start and floats[costs_at + cheaper_end - 1] == cost:
                first_replaced -= 1
            end_replaced = cheaper_end
            while end_replaced < point and floats[values_at + end_replaced] <= value:
                end_replaced += 1
            shift = 1 - (end_replaced - first_replaced)
            if shift != 0:
                step = -1 if shift > 0 else 1
                first_moved, end_moved = (point - 1, end_replaced - 1) if shift > 0 else (end_replaced, point)
                for moved in range(first_moved, end_moved, step):
                    floats[costs_at + moved + shift] = floats[costs_at + moved]
                    floats[values_at + moved + shift] = floats[values_at + moved]
                    integers[options_at + moved + shift] = integers[options_at + moved]
            point += shift
            floats[costs_at + first_replaced] = cost
            floats[values_at + first_replaced] = value
            integers[options_at + first_replaced] = option
    integers[starts_at + service_count] = point
    return point


@njit(cache=True)
def _meet_in_the_middle(floats, costs_at, values_at, integers, starts_at, service_count, limit_mbps,
                        search_limit_mbps, max_combinations, within_at, points_at, combinations_at,
                        order_at):
    """`exact.meet_in_the_middle` on the frontier table in the scratch arrays: the flat index of
    the optimal point per service into integers[points_at:]; False (and nothing chosen) past
    `max_combinations`. Needs 7 * max_combinations + 1 floats at combinations_at and
    2 * max_combinations integers at order_at."""
    for service in range(service_count):
        start = integers[starts_at + service]
        end = integers[starts_at + service + 1]
        count = 0
        # A service's points are cost-sorted: those within the limit are a prefix.
        while start + count < end and floats[costs_at + start + count] <= limit_mbps:
            count += 1
        integers[within_at + service] = count
    half = service_count // 2
    if half == 0:
        integers[points_at] = integers[starts_at] + integers[within_at] - 1
        return True
    first_size = 1
    for service in range(half):
        first_size *= integers[within_at + service]
        if first_size > max_combinations:
            return False
    second_size = 1
    for service in range(half, service_count):
        second_size *= integers[within_at + service]
        if second_size > max_combinations:
            return False
    # Back to back, each as long as it needs to be: the fewer cache lines, the faster.
    first_costs_at = combinations_at
    first_values_at = first_costs_at + first_size
    second_costs_at = first_values_at + first_size
    second_values_at = second_costs_at + second_size
    sorted_costs_at = second_values_at + second_size
    sorted_values_at = sorted_costs_at + second_size
    best_second_at = sorted_values_at + second_size  # second_size + 1 long
    buffer_at = order_at + second_size
    _fill_combinations(floats, costs_at, values_at, integers, starts_at, within_at, 0, half,
                       first_costs_at, first_values_at)
    _fill_combinations(floats, costs_at, values_at, integers, starts_at, within_at, half, service_count,
                       second_costs_at, second_values_at)
    # numpy sorts by cost alone (stable); the value breaking cost ties here changes nothing:
    # every partner search ends between cost groups, and the chosen partner is the first entry
    # of the greatest value in the prefix either way.
    for position in range(second_size):
        integers[order_at + position] = position
    _sort_by_cost_then_value(integers, order_at, buffer_at, second_size, floats, second_costs_at, second_values_at)
    for position in range(second_size):
        combination = integers[order_at + position]
        floats[sorted_costs_at + position] = floats[second_costs_at + combination]
        floats[sorted_values_at + position] = floats[second_values_at + combination]
    floats[best_second_at] = -math.inf  # no partner fits
    for position in range(second_size):
        best = floats[best_second_at + position]
        if floats[sorted_values_at + position] > best:
            best = floats[sorted_values_at + position]
        floats[best_second_at + position + 1] = best
    chosen = 0
    chosen_partners = 0
    best_total = -math.inf
    for combination in range(first_size):
        partners = _count_at_most(floats, sorted_costs_at, second_size,
                                  search_limit_mbps - floats[first_costs_at + combination])
        total = floats[first_values_at + combination] + floats[best_second_at + partners]
        if total > best_total or combination == 0:  # the first of the best, as argmax
            best_total = total
            chosen = combination
            chosen_partners = partners
    second_chosen = 0
    for position in range(1, chosen_partners):
        if floats[sorted_values_at + position] > floats[sorted_values_at + second_chosen]:
            second_chosen = position
    second_choice = integers[order_at + second_chosen]
    # Unravel: the last service of each half varies fastest.
    for service in range(half - 1, -1, -1):
        count = integers[within_at + service]
        integers[points_at + service] = integers[starts_at + service] + chosen % count
        chosen //= count
    for service in range(service_count - 1, half - 1, -1):
        count = integers[within_at + service]
        integers[points_at + service] = integers[starts_at + service] + second_choice % count
        second_choice //= count
    return True


@njit(cache=True)
def _fill_combinations(floats, costs_at, values_at, integers, starts_at, within_at, first_service, end_service,
                       out_costs_at, out_values_at):
    """Every combination of one point (within the limit) per service in [first_service,
    end_service), the last service varying fastest, costs and values summed in service order
    (as `np.add.outer`)."""
    start = integers[starts_at + first_service]
    count = integers[within_at + first_service]
    for point in range(count):
        floats[out_costs_at + point] = floats[costs_at + start + point]
        floats[out_values_at + point] = floats[values_at + start + point]
    for service in range(first_service + 1, end_service):
        start = integers[starts_at + service]
        width = integers[within_at + service]
        # Extend in place from the back: entry k becomes entries k * width .. k * width + width - 1.
        for combination in range(count - 1, -1, -1):
            base_cost = floats[out_costs_at + combination]
            base_value = floats[out_values_at + combination]
            for point in range(width):
                floats[out_costs_at + combination * width + point] = base_cost + floats[costs_at + start + point]
                floats[out_values_at + combination * width + point] = base_value + floats[values_at + start + point]
        count *= width


@njit(cache=True)
def _precedes(cost_a: float, value_a: float, cost_b: float, value_b: float) -> bool:
    """Frontier order: critical bandwidth ascending, then weighted utility descending (table
    order breaks the remaining ties, as the sorts are stable)."""
    return cost_a < cost_b or (cost_a == cost_b and value_a > value_b)


@njit(cache=True)
def _sort_by_cost_then_value(integers, order_at, buffer_at, count, floats, costs_at, values_at):
    """Sorts the `count` indices at integers[order_at:] in place by `_precedes` of their
    (cost, value), stably: insertion-sorted runs, then bottom-up merges through the buffer at
    buffer_at that take from the right run only when its entry strictly precedes."""
    for run_start in range(0, count, _INSERTION_RUN):
        run_end = min(run_start + _INSERTION_RUN, count)
        for position in range(run_start + 1, run_end):
            moving = integers[order_at + position]
            slot = position
            while slot > run_start:
                before = integers[order_at + slot - 1]
                if not _precedes(floats[costs_at + moving], floats[values_at + moving],
                                 floats[costs_at + before], floats[values_at + before]):
                    break
                integers[order_at + slot] = before
                slot -= 1
            integers[order_at + slot] = moving
    source_at, target_at = order_at, buffer_at
    run = _INSERTION_RUN
    while run < count:
        for left in range(0, count, 2 * run):
            middle = min(left + run, count)
            right = min(left + 2 * run, count)
            first, second, out = left, middle, left
            while first < middle and second < right:
                first_entry = integers[source_at + first]
                second_entry = integers[source_at + second]
                if _precedes(floats[costs_at + second_entry], floats[values_at + second_entry],
                             floats[costs_at + first_entry], floats[values_at + first_entry]):
                    integers[target_at + out] = second_entry
                    second += 1
                else:
                    integers[target_at + out] = first_entry
                    first += 1
                out += 1
            while first < middle:
                integers[target_at + out] = integers[source_at + first]
                first += 1
                out += 1
            while second < right:
                integers[target_at + out] = integers[source_at + second]
                second += 1
                out += 1
        source_at, target_at = target_at, source_at
        run *= 2
    if source_at != order_at:  # the sorted entries ended up in the buffer
        for position in range(count):
            integers[order_at + position] = integers[source_at + position]


@njit(cache=True)
def _count_at_most(floats, sorted_at, count, limit):
    """How many of the `count` ascending floats at sorted_at are <= limit (numpy's
    searchsorted, side='right')."""
    low, high = 0, count
    while low < high:
        middle = (low + high) // 2
        if floats[sorted_at + middle] <= limit:
            low = middle + 1
        else:
            high = middle
    return low


# ---------------------------------------------------------------- the cell solver (optimizer/cell.py)


@njit(cache=True)
def row_frontiers(costs, values):
    """`cell.RowFrontiers` of a (row x column) table: (order, present, sorted costs, sorted
    values), each row sorted by `_precedes` (column order on full ties, as numpy's lexsort),
    points off the frontier marked with cost inf and value -inf; and whether every row's
    cheapest point costs 0."""
    row_count, width = costs.shape
    order = np.empty((row_count, width), dtype=np.intp)
    present = np.empty((row_count, width), dtype=np.bool_)
    sorted_costs = np.empty((row_count, width))
    sorted_values = np.empty((row_count, width))
    every_row_has_fallback = True
    for row in range(row_count):
        for position in range(width):
            moving = position
            slot = position
            while slot > 0:
                before = order[row, slot - 1]
                if not _precedes(costs[row, moving], values[row, moving], costs[row, before], values[row, before]):
                    break
                order[row, slot] = before
                slot -= 1
            order[row, slot] = moving
        if costs[row, order[row, 0]] != 0:
            every_row_has_fallback = False
        best_value = -math.inf
        for position in range(width):
            column = order[row, position]
            cost = costs[row, column]
            value = values[row, column]
            keep = (position == 0 or value > best_value) and cost < math.inf
            if position == 0 or value > best_value:
                best_value = value
            present[row, position] = keep
            sorted_costs[row, position] = cost if keep else math.inf
            sorted_values[row, position] = value if keep else -math.inf
    return order, present, sorted_costs, sorted_values, every_row_has_fallback


@njit(cache=True)
def upper_hulls(present, costs, values):
    """`cell._upper_hulls` on `row_frontiers`' output: each row's upper concave hull by the
    monotone chain, (hull points per row, left-aligned; how many)."""
    row_count, width = costs.shape
    hull = np.zeros((row_count, width), dtype=np.intp)
    sizes = np.ones(row_count, dtype=np.intp)
    for row in range(row_count):
        size = 1
        for column in range(1, width):
            if not present[row, column]:
                continue
            new_cost, new_value = costs[row, column], values[row, column]
            while size >= 2:
                top, under = hull[row, size - 1], hull[row, size - 2]
                top_cost, top_value = costs[row, top], values[row, top]
                # The numpy version's pop test, operation for operation.
                if (top_value - values[row, under]) * (new_cost - top_cost) <= (
                        new_value - top_value) * (top_cost - costs[row, under]):
                    size -= 1
                else:
                    break
            hull[row, size] = column
            size += 1
        sizes[row] = size
    return hull, sizes
