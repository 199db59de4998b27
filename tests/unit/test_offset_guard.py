"""Finding the offsets the consumer skipped (pipeline.offset_guard)."""

from __future__ import annotations

from pipeline.offset_guard import Hole, find_holes


def test_contiguous_offsets_have_no_holes_and_advance_what_is_owed() -> None:
    expected = {0: 10}
    assert find_holes(expected, [(0, 10), (0, 11), (0, 12)]) == []
    assert expected == {0: 13}


def test_a_batch_starting_past_what_is_owed_has_a_hole_before_it() -> None:
    expected = {0: 10, 1: 5}
    assert find_holes(expected, [(1, 5), (0, 160), (0, 161)]) == [Hole(0, 10, 160)]
    assert expected == {0: 162, 1: 6}


def test_a_jump_inside_a_batch_is_a_hole() -> None:
    expected = {2: 0}
    assert find_holes(expected, [(2, 0), (2, 1), (2, 7), (2, 8)]) == [Hole(2, 2, 7)]


def test_redelivered_offsets_pass_and_owe_nothing_new() -> None:
    expected = {0: 50}
    assert find_holes(expected, [(0, 40), (0, 41), (0, 50)]) == []
    assert expected == {0: 51}
