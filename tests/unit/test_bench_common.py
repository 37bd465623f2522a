"""The benchmarks' interleaving (bench/common.py): every call once per round, the order rotated each round."""

from __future__ import annotations

import pytest

from bench import common  # imports only the standard library and numpy at module level


def test_rotated_orders_rotate_by_one_each_round():
    assert common.rotated_orders(["a", "b", "c"], 4) == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_two_names_alternate_and_start_shifts_the_first_round():
    assert common.rotated_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert common.rotated_orders(["a", "b"], 2, start=1) == [["b", "a"], ["a", "b"]]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_each_name_goes_first_and_last_equally_often(count):
    names = [f"n{i}" for i in range(count)]
    orders = common.rotated_orders(names, 4 * count)
    assert all(sorted(order) == sorted(names) for order in orders)
    for name in names:
        assert sum(order[0] == name for order in orders) == 4
        assert sum(order[-1] == name for order in orders) == 4


def test_interleaved_samples_call_in_rotated_rounds_and_time_only_after_warmup():
    calls: list[str] = []
    samples = common.interleaved_samples(
        {name: (lambda name=name: calls.append(name)) for name in ("p", "q", "r")}, repeats=2, warmup=1)
    assert calls == ["p", "q", "r", "q", "r", "p", "r", "p", "q"]
    assert {name: len(values) for name, values in samples.items()} == {"p": 2, "q": 2, "r": 2}
    assert all(value >= 0 for values in samples.values() for value in values)
