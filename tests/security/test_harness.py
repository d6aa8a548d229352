"""The harness itself: an accepted attempt must fail its test."""

from __future__ import annotations

import pytest

from tests.security.rows import Door


def test_an_accepted_attempt_fails_the_test() -> None:
    """A door that lets an attempt through turns the test red, naming the attempt."""
    d = Door(test="selftest", registry=[])
    with pytest.raises(pytest.fail.Exception, match="security door open"):
        d.attempt(
            "harness",
            "a deliberately accepted attempt",
            expected="refusal",
            observed="200",
            refused=False,
        )


def test_a_refused_attempt_is_recorded(door: Door) -> None:
    """A refused attempt is kept as a row for the summary."""
    door.attempt("harness", "a refused attempt", expected="403", observed="403", refused=True)
    assert door.rows[0].refused
