"""Thread counts follow the CPUs a process may use: affinity and the cgroup quota, not the host."""

import os

import pytest

from stillroom.cpus import native_bf16, set_torch_threads, usable_cpus, warn_if_slow_bf16

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, min(AFFINITY, 2)),  # cgroup v2: 1.5 CPUs -> 2 threads
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still gets one thread
    ({"cpu.max": "max 100000\n"}, AFFINITY),  # no quota: the affinity mask decides
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # v1 unlimited
    ({"cpu.max": "garbage\n"}, AFFINITY),  # unreadable: ignored, not fatal
    ({}, AFFINITY),  # no cgroup files at all (not Linux, or not mounted)
])
def test_usable_cpus_takes_the_cgroup_quota_and_the_affinity(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cpus(tmp_path) == expected


def test_set_torch_threads_caps_the_default_and_honours_an_explicit_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(64)  # what torch picks by itself on a big host
        assert set_torch_threads() == min(64, usable_cpus()) == torch.get_num_threads()
        assert set_torch_threads(3) == 3 == torch.get_num_threads()  # `threads:` in the config wins
    finally:
        torch.set_num_threads(before)


def test_native_bf16_agrees_with_the_cpus_own_flags_and_warns_only_without_it():
    pytest.importorskip("torch")
    import warnings
    from pathlib import Path

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system to check against")
    native = native_bf16()
    if native is None:
        pytest.skip("this torch has no bf16 probes")
    assert native == ("avx512_bf16" in flags or "amx_tile" in flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_slow_bf16("training")
    slow = [w for w in caught if "no native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "precision: fp32" in str(slow[0].message) and str(slow[0].message).startswith("training uses bf16")
