"""The pure parts of the write-path benches: fio's JSON, percentiles, lag bounds, growth, the
ratio table and the target verdicts (the benches themselves are run by hand, not by the suite)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import broker_common  # noqa: E402
import broker_lag  # noqa: E402
import failover  # noqa: E402
import scale  # noqa: E402
import writepath  # noqa: E402

S = 1_000_000_000


def fio_output(*jobs: tuple[float, float, int, int, int]) -> str:
    """What fio's nbd engine prints: a line, then the JSON document."""
    doc = {
        "jobs": [
            {
                "write": {
                    "iops": iops,
                    "bw": bw_kib,
                    "io_bytes": io_bytes,
                    "clat_ns": {
                        "percentile": {
                            "50.000000": p50,
                            "90.000000": 2 * p50,
                            "99.000000": p99,
                            "99.900000": 3 * p99,
                        }
                    },
                },
                "usr_cpu": 30.5,
                "sys_cpu": 11.5,
            }
            for iops, bw_kib, io_bytes, p50, p99 in jobs
        ]
    }
    return "fio: connected to NBD server\n" + json.dumps(doc)


def test_parse_fio_reads_every_job() -> None:
    """IOPS, MiB/s, latency percentiles in ms, bytes and fio's own CPU (in cores) come out of
    each job of fio's JSON."""
    out = fio_output((5120.0, 20480.0, 1 << 30, 230_000, 4_880_000), (10.0, 1024.0, 4096, 1, 2))
    first, second = writepath.parse_fio_jobs(out)
    assert first == {
        "iops": 5120.0,
        "mib_s": 20.0,
        "clat_p50_ms": 0.23,
        "clat_p90_ms": 0.46,
        "clat_p99_ms": 4.88,
        "clat_p999_ms": 14.64,
        "bytes": float(1 << 30),
        "fio_cpu": 0.42,
    }
    assert second["mib_s"] == 1.0
    assert writepath.parse_fio(out) == first


def test_core_times_count_a_busy_core() -> None:
    """The guest core's busy ticks grow by about the time a process spins on it, its total by
    the time passed; a core that does not exist is an error, not zeros."""
    import os
    import time

    cpu = str(sorted(os.sched_getaffinity(0))[0])
    busy0, total0 = writepath.core_times(cpu)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu)})
    try:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
    finally:
        os.sched_setaffinity(0, saved)
    busy1, total1 = writepath.core_times(cpu)
    assert (busy1 - busy0) / (total1 - total0) > 0.5
    with pytest.raises(RuntimeError, match="no cpu100000"):
        writepath.core_times("100000")


def test_own_cpu_leaves_out_what_a_child_process_spent() -> None:
    """The agent's CPU is split as writepath reports it: a process whose child spun 0.3 CPU-s and
    ended has almost no CPU of its own, and the child's counted with it (waited-for time)."""
    import subprocess

    spin = "import time\nwhile time.process_time() < 0.3: pass"
    waits = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {spin!r}]); "
    with subprocess.Popen(
        [sys.executable, "-c", waits + "print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    ) as parent:
        try:
            assert parent.stdout is not None
            parent.stdout.readline()  # the child ended and was waited for
            total, own = broker_common.proc_cpu(parent.pid), broker_common.own_cpu(parent.pid)
            assert total - own >= 0.25, (total, own)  # 10 ms ticks
            assert own < 0.2, own
        finally:
            parent.kill()
    assert broker_common.own_cpu(parent.pid) == 0.0  # it ended: nothing to read any more


def test_percentile_interpolates_between_ranks() -> None:
    """pct is the linear interpolation between closest ranks, and NaN for no values."""
    values = [float(v) for v in range(1, 101)]
    assert broker_lag.pct(values, 50) == 50.5
    assert abs(broker_lag.pct(values, 99) - 99.01) < 1e-9
    assert broker_lag.pct([3.0], 99) == 3.0
    assert broker_lag.pct([], 99) != broker_lag.pct([], 99)  # NaN


def steady_phase(lags: list[float], interval: float = 1.0) -> broker_lag.Phase:
    """Cuts every ``interval`` s from t=0; cut k applied lags[k] s after it; load from 0.5 s to
    the last cut."""
    cycles = [(int(k * interval * S), int((k * interval + lag) * S)) for k, lag in enumerate(lags)]
    end = cycles[-1][0] - S // 2
    return broker_lag.Phase(cycles, S // 2, end, [], {}, 0.0, True)


def test_lag_bound_is_apply_minus_previous_cut() -> None:
    """A loaded cycle's bound is applied[k] - cut[k-1], from the load's start at the earliest."""
    figs = broker_lag.lag_figures(steady_phase([0.2, 0.3, 0.4, 0.5]))
    assert [round(v, 6) for v in figs["write_to_replica"]] == [0.8, 1.4, 1.5]
    assert [round(v, 6) for v in figs["pipeline"]] == [0.3, 0.4, 0.5]


def test_lag_bound_starts_no_earlier_than_the_load() -> None:
    """After an idle gap with no batches, the first loaded cycle counts from the load's start."""
    cycles = [(0, S // 10), (20 * S, 20 * S + S // 2), (21 * S, 21 * S + S // 2)]
    phase = broker_lag.Phase(cycles, 19 * S + S // 2, 21 * S, [], {}, 0.0, True)
    assert [round(v, 6) for v in broker_lag.lag_figures(phase)["write_to_replica"]] == [1.0, 1.5]


def test_the_load_starts_at_its_first_write_not_at_fios_launch(tmp_path: Path) -> None:
    """FirstWrite keeps the last poll before the image's mtime changed: never after the write."""
    image = tmp_path / "image"
    image.write_bytes(bytes(4096))
    os.utime(image, ns=(0, 0))
    first = broker_lag.FirstWrite(image)
    first.start()
    launched = time.time_ns()
    time.sleep(0.2)  # fio's start-up
    before = time.time_ns()
    with image.open("r+b") as f:
        f.write(b"x")
    after = time.time_ns()
    time.sleep(0.02)
    start = first.load_start(launched)
    assert before - 50_000_000 <= start <= after
    quiet = broker_lag.FirstWrite(image)
    quiet.start()
    assert quiet.load_start(launched) == launched  # nothing written: the launch


def test_growth_compares_first_and_last_windows() -> None:
    """A lag that climbs over the run shows a last-window p99 above the first-window p99."""
    flat = broker_lag.growth(steady_phase([0.3] * 12), window=3.0)
    assert abs(flat[0] - flat[1]) < 1e-9
    first, last = broker_lag.growth(steady_phase([0.1 * k for k in range(12)]), window=3.0)
    assert last > first + 0.2


def test_targets_follow_the_interval() -> None:
    """1 s cycles are held to 1.5 s, shorter ones to 0.6 s."""
    assert broker_lag.target_p99(1.0) == 1.5
    assert broker_lag.target_p99(0.25) == 0.6


def medians(ours: dict[str, float], qemu: dict[str, float]) -> dict[str, object]:
    """A median table with the same figures for every job and nbdkit at twice qemu-nbd."""
    nbdkit = {k: 2 * v for k, v in qemu.items()}
    return {job: {"ours": ours, "qemu-nbd": qemu, "nbdkit": nbdkit} for job in writepath.JOBS}


def test_ratio_table_and_verdicts() -> None:
    """Ratios are ours ÷ peer, and each target holds or misses on the right side of its bound."""
    qemu = {"iops": 100.0, "mib_s": 10.0, "clat_p50_ms": 1.0, "clat_p99_ms": 2.0}
    good = dict(qemu, shipped_per_written=1.1, lag_p99_s=1.2)
    rows = writepath.ratio_rows(medians(good, qemu))
    iops = next(r for r in rows if r["job"] == "randwrite-4k-qd32" and r["figure"] == "iops")
    assert iops["÷ qemu-nbd"] == 1.0
    assert iops["÷ nbdkit"] == 0.5
    assert all(holds for _, _, holds in writepath.verdicts(medians(good, qemu)))
    bad = dict(qemu, iops=90.0, mib_s=9.0, clat_p99_ms=3.2, shipped_per_written=9.0, lag_p99_s=2.4)
    assert not any(holds for _, _, holds in writepath.verdicts(medians(bad, qemu)))


def test_shipped_bytes_count_only_acked_deltas_after_the_offset(tmp_path: Path) -> None:
    """data_bytes of non-FULL batch_acked lines after the offset are summed; others ignored."""
    log = tmp_path / "agent.log"
    before = json.dumps({"event": "batch_acked", "full": False, "data_bytes": 999}) + "\n"
    lines = [
        {"event": "batch_acked", "full": False, "data_bytes": 4096},
        {"event": "batch_acked", "full": True, "data_bytes": 1 << 20},
        {"event": "cut_taken", "data_bytes": 7},
        {"event": "batch_acked", "full": False, "data_bytes": 8192},
    ]
    log.write_text(before + "".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    assert writepath.shipped_data_bytes(log, len(before)) == 12288


def test_scale_summary_counts_disks_within_target() -> None:
    """The scale summary gives the worst and median p99 and how many disks meet 1.5 s."""
    s = scale.summary({"a": 0.9, "b": 1.4, "c": 2.0})
    assert s == {"worst_p99": 2.0, "median_p99": 1.4, "disks_within_target": 2, "disks": 3}
    argv = scale.fio_argv(["nbd+unix:///a", "nbd+unix:///b"], 1 << 20, "1m", 5)
    assert argv.count("--uri=nbd+unix:///a") == 1
    assert "--name=d1" in argv


def _failover_doc(one: float, many: float, planned: float, ratio: float) -> dict[str, object]:
    return {
        "unplanned_one": failover.figures([one / 2, one, one]),
        "unplanned_selector_s": many,
        "planned": failover.figures([planned]),
        "reverse_ratio": ratio,
    }


def test_failover_verdicts_hold_at_the_targets_and_miss_above() -> None:
    """Each failover target holds at its value and is missed just above it (p90 for times)."""
    at = _failover_doc(5.0, 15.0, 10.0, 1.1)
    assert [holds for *_, holds in failover.verdicts(at)] == [True] * 4
    above = _failover_doc(5.2, 15.1, 10.1, 1.11)
    assert [holds for *_, holds in failover.verdicts(above)] == [False] * 4


def test_failover_steps_give_guest_start_shutdown_and_shipped_bytes() -> None:
    """From a command's JSON steps: the guest's start time, the shutdown it reported, the bytes
    a reverse shipped (0 shutdown when no guest was shut down)."""
    steps = [
        {"step": "sites surveyed", "elapsed_seconds": 0.05},
        {"step": "site primary: guest shut down", "elapsed_seconds": 0.9, "seconds": 0.6},
        {"step": "site recovery: guest started", "elapsed_seconds": 1.4},
        {"step": "site recovery: shipped", "elapsed_seconds": 1.6, "bytes_shipped": 4096},
    ]
    assert failover.step_seconds(steps, failover.STARTED_STEP) == 1.4
    assert failover.shutdown_seconds(steps) == 0.6
    assert failover.shutdown_seconds(steps[2:]) == 0.0
    assert failover.shipped_bytes(steps) == 4096
    assert failover.figures([1.0, 2.0, 3.0])["p50"] == 2.0


def test_differing_bytes_counts_whole_differing_blocks(tmp_path: Path) -> None:
    """One changed byte counts its whole block; equal blocks count nothing; a tail counts too."""
    a, b = tmp_path / "a", tmp_path / "b"
    data = bytearray(3 * failover.BLOCK + 100)
    a.write_bytes(bytes(data))
    data[failover.BLOCK + 7] = 1
    data[-1] = 1
    b.write_bytes(bytes(data))
    assert failover.differing_bytes(a, a) == 0
    assert failover.differing_bytes(a, b) == failover.BLOCK + 100
