"""What reads as zero at a recovery point, found without reading it.

A range of a point's view certainly reads as zero when it is a hole in the replica image that
no undo data covers, or when undo data says it was zero at the point. Block hashes skip such
ranges (``broker/hashes.py``) and point-in-time exports report them as holes
(``broker/pitexport.py``), so a restore of a sparse disk reads only what the disk holds.
"""

from __future__ import annotations

from broker.pointview import PointView
from broker.undo import KIND_ZERO
from common.fsio import data_segments
from common.regions import subtract, union


def known_zero_ranges(
    view: PointView, image_fd: int, offset: int, length: int
) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of the view that certainly read as zero, sorted and merged."""
    end = offset + length
    # Holes first, overlay second: a batch that punches a hole after the walk was published to
    # the view before it punched, so the overlay taken afterwards covers it.
    holes = [(s, n) for s, n, allocated in data_segments(image_fd, offset, length) if not allocated]
    covered = [
        (max(start, offset), min(stop, end) - max(start, offset), kind)
        for start, stop, _src, _off, kind in view.overlay_in(offset, end)
    ]
    zeros = union(
        [(s, n) for s, n, kind in covered if kind == KIND_ZERO],
        subtract(holes, [(s, n) for s, n, _kind in covered]),
    )
    return [(s, s + n) for s, n in zeros]
