"""collector_memory_limit_bytes: the memory a worker may use, from cgroup v2 and /proc/meminfo texts."""

from __future__ import annotations

from agents.metrics import cgroup_v2_dirs, meminfo_total_bytes, memory_limit_bytes

MEMINFO = "MemTotal:       24683784 kB\nMemFree:        23882404 kB\nMemAvailable:   23000000 kB\n"
MEMTOTAL = 24683784 * 1024


def test_memtotal_is_read_in_bytes() -> None:
    assert meminfo_total_bytes(MEMINFO) == MEMTOTAL
    assert meminfo_total_bytes("MemFree: 1 kB\n") is None
    assert meminfo_total_bytes("MemTotal: lots kB\n") is None


def test_without_a_cgroup_limit_the_machine_memory_is_the_limit() -> None:
    assert memory_limit_bytes([], MEMINFO) == MEMTOTAL
    assert memory_limit_bytes(["max\n", "max\n"], MEMINFO) == MEMTOTAL


def test_the_tightest_cgroup_limit_on_the_way_to_the_root_wins() -> None:
    # The worker's own cgroup has no limit, its parent (a container) has 512 MiB, the grandparent 1 GiB.
    assert memory_limit_bytes(["max\n", "536870912\n", "1073741824\n"], MEMINFO) == 536870912


def test_a_cgroup_limit_above_the_machine_memory_is_capped_by_it() -> None:
    assert memory_limit_bytes(["1099511627776\n"], MEMINFO) == MEMTOTAL


def test_nothing_known_gives_none_and_garbage_is_ignored() -> None:
    assert memory_limit_bytes([], "") is None
    assert memory_limit_bytes(["", "-1\n", "max"], "") is None
    assert memory_limit_bytes(["268435456"], "") == 268435456


def test_the_cgroup_v2_path_lists_the_process_cgroup_and_its_ancestors() -> None:
    assert cgroup_v2_dirs("0::/system.slice/collector.service\n") == [
        "system.slice/collector.service",
        "system.slice",
        "",
    ]
    assert cgroup_v2_dirs("0::/\n") == [""]  # in a container with its own cgroup namespace
    # cgroup v1 (or hybrid without a v2 line): no v2 directory to read
    assert cgroup_v2_dirs("4:memory:/docker/abc\n1:cpu:/\n") == []
    hybrid = "4:memory:/process_api/c4a2\n0::/\n"
    assert cgroup_v2_dirs(hybrid) == [""]
