"""The sans-I/O sequencer of one disk: next seq, resend after a failure, cut ids, modes."""

from __future__ import annotations

import json

import pytest

from agents.sequence import Mode, SequenceError, Sequencer


def test_numbering_starts_after_the_brokers_durable_seq() -> None:
    """Adopting the broker's state numbers the next batch durable_seq + 1, and acks move on."""
    seq = Sequencer(guest_ops=0)
    seq.adopt(Mode.DELTA, durable_seq=41)
    assert seq.next_seq == 42
    seq.acked(42, cut_id=7)
    assert seq.next_seq == 43


def test_a_failed_batch_is_resent_under_the_number_the_broker_gives() -> None:
    """After a failure the resend takes durable_seq + 1 again, whether or not the ack was lost."""
    seq = Sequencer(guest_ops=0)
    seq.adopt(Mode.DELTA, durable_seq=5)
    sent = seq.next_seq
    # The batch failed and the broker never made it durable: the same number goes again.
    seq.adopt(Mode.DELTA, durable_seq=5)
    assert seq.next_seq == sent == 6
    # The ack was lost but the batch is durable: the merged-back blocks go as the next seq.
    seq.adopt(Mode.DELTA, durable_seq=6)
    assert seq.next_seq == 7


def test_a_stale_or_duplicate_ack_is_refused() -> None:
    """An ack for another seq, or a duplicate ack, raises SequenceError naming both numbers."""
    seq = Sequencer(guest_ops=0)
    seq.check_ack(3, 3, duplicate=False)
    with pytest.raises(SequenceError, match=r"acked seq 2 .* for batch 3"):
        seq.check_ack(3, 2, duplicate=False)
    with pytest.raises(SequenceError, match="duplicate=True"):
        seq.check_ack(3, 3, duplicate=True)


def test_first_change_cut_is_the_first_cut_with_a_change_since_the_last_ack() -> None:
    """A changed disk keeps the first cut it changed at until an ack; an idle one states its own."""
    seq = Sequencer(guest_ops=10)
    seq.adopt(Mode.DELTA, durable_seq=0)
    assert seq.first_change_cut(3) == 0  # pending changes of unknown age after a start
    seq.acked(1, cut_id=3)
    seq.note_cut(4, guest_ops=10)  # no guest write since
    assert seq.first_change_cut(4) == 4
    seq.note_cut(5, guest_ops=12)
    seq.note_cut(6, guest_ops=15)  # a failed cut keeps the changes' first cut
    assert seq.first_change_cut(6) == 5
    seq.acked(2, cut_id=6)
    assert seq.first_change_cut(7) == 7
    seq.unknown_changes()
    assert seq.first_change_cut(8) == 0


def test_broker_cut_id_only_grows_with_acks() -> None:
    """An ack of an older cut never lowers the newest VM cut the broker holds."""
    seq = Sequencer(guest_ops=0)
    seq.broker_holds(9)
    seq.adopt(Mode.DELTA, durable_seq=3)
    seq.acked(4, cut_id=8)
    assert seq.broker_cut_id == 9
    seq.acked(5, cut_id=12)
    assert seq.broker_cut_id == 12


def test_modes_move_from_initial_to_delta_and_seeds_stop_numbering() -> None:
    """The last FULL batch ends the initial copy; a seed export or wait ships nothing."""
    seq = Sequencer(guest_ops=0)
    seq.adopt(Mode.INITIAL, durable_seq=0)
    seq.acked(1, cut_id=1)
    assert seq.mode is Mode.INITIAL
    seq.acked(2, cut_id=2, initial_done=True)
    assert (seq.mode, seq.next_seq) == (Mode.DELTA, 3)
    seq.seed_exported()
    assert (seq.mode, seq.next_seq, seq.change_cut) == (Mode.AWAITING_SEED, 0, None)
    seq.adopt(Mode.AWAITING_SEED, durable_seq=7)
    assert seq.next_seq == 0
    assert json.dumps({"mode": seq.mode}) == '{"mode": "awaiting_seed"}'  # the status wire form
