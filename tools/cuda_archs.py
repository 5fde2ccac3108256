#!/usr/bin/env python3
"""The CUDA architectures turbokv's kernels are built for, as nvcc -gencode flags.

CMakeLists.txt runs this at configure time; tools/check_cuda_compile.sh runs it (with --wheel when asked).
The first of these that is given decides:
  1. --gencode FLAGS (CMake's TURBOKV_CUDA_GENCODE): nvcc flags used as they are;
  2. TORCH_CUDA_ARCH_LIST, in torch's syntax ("8.0;8.6;9.0a;12.0+PTX", spaces separate too):
     "+PTX" also embeds that architecture's PTX, which the driver compiles for newer GPUs;
  3. the GPUs torch sees (their compute capabilities; 9.0 builds sm_90a, as the wheel list);
  4. the wheel list, WHEEL_ARCHS (no GPU visible: a build for distribution).
Prints three lines: where the list came from, what is built (e.g. "sm_80 sm_90a compute_80"),
and the -gencode flags. Exits 1 with a message naming the bad entry.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# Ampere (A100 sm_80; RTX 30, A10, A40 sm_86), Ada (L4, L40, RTX 40 sm_89), Hopper (sm_90a),
# Blackwell (B200 sm_100, RTX 50 / RTX PRO sm_120). A cubin runs on GPUs of its major version
# and a minor version at least its own (sm_80 also covers sm_87, sm_120 sm_121). compute_80
# PTX covers everything else (sm_110, later majors) by driver JIT; it is the lowest PTX the
# kernels need (cp.async, bf16 mma), so it also runs on any GPU newer than the list; compute_120
# PTX would not run on sm_110. Code JIT-compiled from it lacks only the sm_90+ launch overlap.
WHEEL_ARCHS = "8.0;8.6;8.9;9.0a;10.0;12.0;8.0+PTX"
MIN_CAPABILITY = 80  # cp.async, bf16 mma.sync, max.NaN: the kernels need sm_80

ENTRY = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


def parse_arch_list(text: str, source: str) -> list[str]:
    """'8.0;9.0a+PTX' -> ['sm_80', 'sm_90a', 'compute_90a'] (order kept, duplicates dropped)."""
    out: list[str] = []
    for entry in re.split(r"[;\s]+", text.strip()):
        if not entry:
            continue
        m = ENTRY.match(entry)
        if m is None:
            sys.exit(f"turbokv: {source}: got '{entry}', expected entries like 8.0, 9.0a or 12.0+PTX")
        cc = int(m[1]) * 10 + int(m[2])
        if cc < MIN_CAPABILITY:
            sys.exit(f"turbokv: {source}: got '{entry}', the kernels need compute capability 8.0 or newer")
        name = f"{cc}{m[3]}"
        for arch in [f"sm_{name}"] + ([f"compute_{name}"] if m[4] else []):
            if arch not in out:
                out.append(arch)
    if not out:
        sys.exit(f"turbokv: {source}: got '{text}', expected at least one architecture")
    return out


def virtual_arch(arch: str) -> str:
    """The PTX a cubin or PTX entry is compiled from: the kernels' device code has two paths,
    __CUDA_ARCH__ below 900 and from 900 (PDL's griddepcontrol, common.cuh), so every cubin of a
    path comes from that path's lowest PTX: compute_80 for sm_80..sm_89, compute_90 for sm_100,
    sm_120 (and sm_90); sm_90a from compute_90a; PTX entries are their own."""
    name = arch.split("_")[1]
    if arch.startswith("compute_") or name.endswith(("a", "f")):
        return f"compute_{name}"
    return "compute_80" if int(name) < 90 else "compute_90"


def gencode(archs: list[str]) -> str:
    """One -gencode per virtual architecture, with every cubin / PTX built from it: nvcc runs the
    front end once per -gencode and ptxas once per cubin (the front end is about half of a large
    kernel file's time, so the wheel list's six cubins take three front-end passes, not six)."""
    groups: dict[str, list[str]] = {}
    for a in archs:
        groups.setdefault(virtual_arch(a), []).append(a)
    return " ".join(
        f"-gencode=arch={v},code={codes[0] if len(codes) == 1 else '[' + ','.join(codes) + ']'}"
        for v, codes in groups.items()
    )


def archs_of_gencode(flags: str) -> list[str]:
    """What nvcc flags build: the code= entries of each -gencode (sm_XX cubins, compute_XX PTX)."""
    found = [a for codes in re.findall(r",code=\[?([\w,]+)\]?", flags) for a in codes.split(",")]
    found += re.findall(r"-arch[= ](sm_\w+)", flags)
    return list(dict.fromkeys(found)) or ["(see flags)"]


def visible_gpus() -> str | None:
    """TORCH_CUDA_ARCH_LIST-style list of the GPUs torch sees, or None without any."""
    try:
        import torch
    except ImportError:
        return None
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}" for major, minor in caps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gencode", default="", help="explicit nvcc -gencode flags (wins over everything)")
    ap.add_argument("--wheel", action="store_true", help="the wheel list, whatever the environment says")
    args = ap.parse_args()
    if args.gencode.strip():
        source, flags = "TURBOKV_CUDA_GENCODE", args.gencode.strip()
        archs = archs_of_gencode(flags)
    else:
        env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        gpus = None if args.wheel or env else visible_gpus()
        if args.wheel:
            source, text = "wheel list", WHEEL_ARCHS
        elif env:
            source, text = "TORCH_CUDA_ARCH_LIST", env
        elif gpus:
            source, text = "GPUs present", gpus
        else:
            source, text = "wheel list (no GPU visible)", WHEEL_ARCHS
        archs = parse_arch_list(text, source)
        flags = gencode(archs)
    print(source)
    print(" ".join(archs))
    print(flags)


if __name__ == "__main__":
    main()
