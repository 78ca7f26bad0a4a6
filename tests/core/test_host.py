"""The CPU classes whose int8 dot products differ (edgevit.core.host.INT8_KERNEL_CLASSES)."""
from __future__ import annotations

import platform

import pytest

from edgevit.core import host


@pytest.mark.parametrize("features, machine, system, expected", [
    (["avx2", "avx512f", "avx512bw", "avx512_vnni"], "x86_64", "Linux", host.X86_VNNI),
    (["avx2", "avx_vnni"], "x86_64", "Linux", host.X86_VNNI),  # Alder Lake: VNNI without AVX-512
    (["avx2", "amx_int8"], "x86_64", "Linux", host.X86_VNNI),
    (["avx2"], "x86_64", "Linux", host.X86_NO_VNNI),  # the AVX2-only hosts of issue #13
    (["avx2", "avx512f", "avx512bw"], "x86_64", "Linux", host.X86_NO_VNNI),  # Skylake-SP: VPMADDUBSW too
    ([], "x86_64", "Linux", host.X86_NO_VNNI),  # SSE4.1 only
    (["asimddp", "i8mm"], "aarch64", "Linux", host.ARM_DOT),
    ([], "aarch64", "Linux", host.ARM_NO_DOT),  # Cortex-A53/A72 (Raspberry Pi 3/4)
    (None, "arm64", "Darwin", host.ARM_DOT),  # Apple silicon, no /proc/cpuinfo
    (None, "x86_64", "Darwin", None),  # unread: unknown, not "without VNNI"
    (["avx2"], "riscv64", "Linux", None),
])
def test_kernel_classes(features, machine, system, expected):
    assert host.kernel_class(features, machine, system) == expected


def test_this_host_is_recorded_as_its_class():
    record = host.host_isa()
    assert record["machine"] == platform.machine()
    assert record["int8_kernels"] == host.kernel_class(record["features"], platform.machine(), platform.system())
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert record["int8_kernels"] in (host.X86_VNNI, host.X86_NO_VNNI) and "avx2" in record["features"]
