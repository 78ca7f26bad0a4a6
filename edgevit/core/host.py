"""What this machine's CPU can do for int8: the instruction-set features that decide both how
fast int8 runs and, on some CPUs, whether it computes exactly (see ``INT8_KERNEL_CLASSES``).

Recorded in every manifest's verification and every profile result, so that int8 figures are
only ever compared across hosts of the same class.
"""
from __future__ import annotations

import platform
from pathlib import Path

# The features that matter for int8 GEMMs, as /proc/cpuinfo spells them.
X86_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
ARM_FEATURES = ("asimddp", "i8mm", "sve", "sme")

# How int8 dot products are computed, per class of CPU. Only the 16-bit intermediate steps can
# lose values: the rest accumulate in int32 (sources: onnxruntime MLAS's QgemmU8X8KernelAvx2 /
# Avx512Core use VPMADDUBSW, which adds two u8·s8 products into a *saturating* int16;
# QgemmS8S8KernelNeon adds two s8·s8 products into an int16 with SMULL+SMLAL, which wraps only
# when both are (-128)·(-128); XNNPACK's Arm "mlal" kernels do the same, and its x86 kernels
# widen to 16 bits before multiplying).
X86_VNNI = "x86 with VNNI or AMX"
X86_NO_VNNI = "x86 without VNNI"
ARM_DOT = "arm64 with dot product"
ARM_NO_DOT = "arm64 without dot product"
INT8_KERNEL_CLASSES = {
    X86_VNNI: "VPDPBUSD / AMX: int32 accumulation",
    X86_NO_VNNI: "AVX2 / AVX-512BW / SSE4.1: u8·s8 pairs summed in saturating int16 (VPMADDUBSW)",
    ARM_DOT: "SDOT / UDOT / SMMLA: int32 accumulation",
    ARM_NO_DOT: "NEON SMULL+SMLAL: two s8·s8 products in int16, wraps only for (-128)·(-128)",
}


def cpu_features() -> list[str] | None:
    """The int8-relevant features of this CPU; None where /proc/cpuinfo cannot be read (macOS,
    Windows), so that an unknown CPU is not taken for one without them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in (*X86_FEATURES, *ARM_FEATURES) if f in flags]


def kernel_class(features: list[str] | None, machine: str, system: str = "Linux") -> str | None:
    """The row of ``INT8_KERNEL_CLASSES`` for a CPU with ``features`` (None: unread) of
    ``machine`` (``platform.machine()``) under ``system``; None where that cannot be told."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64") and system == "Darwin":
        return ARM_DOT  # every Apple silicon core has the dot-product instructions
    if features is None:
        return None
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return X86_VNNI if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features) else X86_NO_VNNI
    if machine in ("aarch64", "arm64"):
        return ARM_DOT if "asimddp" in features else ARM_NO_DOT
    return None


def int8_kernel_class() -> str | None:
    """This host's row of ``INT8_KERNEL_CLASSES``."""
    return kernel_class(cpu_features(), platform.machine(), platform.system())


def host_isa() -> dict[str, object]:
    """The record that goes into manifests and profile results."""
    features = cpu_features()
    return {"machine": platform.machine(), "features": features,
            "int8_kernels": kernel_class(features, platform.machine(), platform.system())}
