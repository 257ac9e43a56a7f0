"""A killed kernel build leaves torch's `lock` marker behind; the next build must not wait on
it forever (seen here: every server start stalled at 0% CPU behind a marker from a build that
had been interrupted an hour before)."""

from __future__ import annotations

import multiprocessing
import time

from kernels import native_loader


def test_a_stale_marker_is_removed_under_the_build_lock(tmp_path):
    (tmp_path / "lock").write_text("")
    with native_loader._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()


def _hold(build_dir: str, seconds: float) -> None:
    with native_loader._build_lock(build_dir):
        time.sleep(seconds)


def test_a_live_build_is_waited_for_and_a_killed_one_is_not(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    holder = ctx.Process(target=_hold, args=(str(tmp_path), 60))
    holder.start()
    deadline = time.time() + 30
    while not (tmp_path / "tandem.flock").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the holder has the flock now
    holder.kill()  # a build killed mid-way: its flock goes with it
    holder.join()
    (tmp_path / "lock").write_text("")  # and torch's marker stays behind
    start = time.perf_counter()
    with native_loader._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    assert time.perf_counter() - start < 5
