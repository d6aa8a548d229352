"""Rows of the security suite: one per attempt, printed at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

_ROWS: list[Row] = []


@dataclass(frozen=True)
class Row:
    """One attempt against one surface and what came of it."""

    surface: str
    attempt: str
    expected: str
    observed: str
    refused: bool

    def text(self) -> str:
        verdict = "REFUSED" if self.refused else "ACCEPTED"
        return (
            f"{verdict:8} | {self.surface} | {self.attempt} | expected: {self.expected} | "
            f"observed: {self.observed}"
        )


@dataclass
class Door:
    """Collects the attempts of one test."""

    test: str
    rows: list[Row] = field(default_factory=list)
    registry: list[Row] = field(default_factory=lambda: _ROWS)
    """Where rows are collected for the summary (the harness's own test passes its own list)."""

    def attempt(
        self, surface: str, attempt: str, *, expected: str, observed: str, refused: bool
    ) -> None:
        """Record one attempt; fail the test at once if it was not refused."""
        row = Row(surface, attempt, expected, str(observed), bool(refused))
        self.rows.append(row)
        self.registry.append(row)
        if not refused:
            pytest.fail(f"security door open: {row.text()}")


def all_rows() -> list[Row]:
    """Every row recorded in this run, in order."""
    return list(_ROWS)
