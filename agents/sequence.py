"""The numbering of one disk's batches and its VM-cut bookkeeping, with no I/O.

:class:`~agents.replicate.DiskReplicator` does the talking (to the broker, the export, the state
file); this class only decides. Tests drive it with plain numbers.

- The broker's ``durable_seq`` is the truth: :meth:`Sequencer.adopt` numbers the next batch
  ``durable_seq + 1`` (before the first batch and after any failure, the replicator asks).
- An acked batch moves the numbering on (:meth:`Sequencer.acked`); a failed one changes nothing
  here: its blocks are merged back into the dirty map (keeping their first cut) and go again in
  the next batch, numbered from what the broker then says. If the ack was only lost, the resent
  blocks apply again on top: same contents or newer.
- ``first_change_cut`` (docs/protocol/batch.md) is the first VM cut since the last acked batch
  at which the disk had changed; a batch of a disk that did not change states its own cut.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """What the next batch of a disk is.

    ``initial`` ships the whole disk as FULL batches; ``verify`` compares block hashes with
    the replica and marks what differs; ``delta`` ships what the dirty map says;
    ``awaiting_seed`` ships nothing until seed media reaches the broker.
    """

    INITIAL = "initial"
    VERIFY = "verify"
    DELTA = "delta"
    AWAITING_SEED = "awaiting_seed"


class SequenceError(ValueError):
    """The broker acked another batch than the one sent: our numbering was stale."""


class Sequencer:
    """Next seq, mode and cut ids of one disk; every change of them goes through here."""

    def __init__(self, guest_ops: int) -> None:
        self.mode = Mode.DELTA
        self.next_seq = 0
        # The first VM cut since the last acked batch at which the disk had changed (None: no
        # change pending; 0: pending changes of unknown age, as after a restart).
        self.change_cut: int | None = 0
        self.broker_cut_id = 0  # the newest VM cut the broker holds durably for this disk
        self._marks_seen = guest_ops

    def broker_holds(self, durable_cut_id: int) -> None:
        """The broker says it holds VM cut ``durable_cut_id`` of this disk durably."""
        self.broker_cut_id = durable_cut_id

    def adopt(self, mode: Mode, durable_seq: int) -> None:
        """Go on in ``mode`` from the broker's ``durable_seq``."""
        self.mode = mode
        if mode is Mode.AWAITING_SEED:
            self.next_seq = 0  # nothing ships until the seed import says where we stand
        else:
            self.next_seq = durable_seq + 1

    def unknown_changes(self) -> None:
        """Changes of unknown age are pending (found by a hash compare, or after a restart)."""
        self.change_cut = 0

    def note_cut(self, cut_id: int, guest_ops: int) -> None:
        """The VM takes cut ``cut_id``; ``guest_ops`` counts the guest's writes so far."""
        if guest_ops != self._marks_seen and self.change_cut is None:
            self.change_cut = cut_id
        self._marks_seen = guest_ops

    def first_change_cut(self, cut_id: int) -> int:
        """The ``first_change_cut`` of a batch of cut ``cut_id``."""
        # No change pending: the disk stayed as it was up to this very cut.
        return cut_id if self.change_cut is None else self.change_cut

    def check_ack(self, seq: int, acked_seq: int, *, duplicate: bool) -> None:
        """Raise :class:`SequenceError` unless the ack is the fresh ack of batch ``seq``."""
        if duplicate or acked_seq != seq:
            raise SequenceError(
                f"the broker acked seq {acked_seq} (duplicate={duplicate}) for batch {seq}:"
                " our numbering was stale"
            )

    def acked(self, seq: int, cut_id: int, *, initial_done: bool = False) -> None:
        """Batch ``seq`` of cut ``cut_id`` is durable; ``initial_done``: its last FULL batch."""
        self.next_seq = seq + 1
        self.change_cut = None  # changes after this cut are noted at the next cuts
        self.broker_cut_id = max(self.broker_cut_id, cut_id)
        if initial_done:
            self.mode = Mode.DELTA

    def seed_exported(self) -> None:
        """Seed media holds the disk at a cut: no change is pending, and nothing ships now."""
        self.change_cut = None
        self.mode = Mode.AWAITING_SEED
        self.next_seq = 0
