"""turbokv's build backend: scikit-build-core, after a check that torch is importable.

The extension is compiled against the torch it will run with (its headers, C++ ABI and, for
CUDA, its CUDA version), so a build in pip's isolated environment, which has no torch (or
would fetch some other one), stops here with what to run instead. Metadata and sdists need
no torch and pass straight through.
"""

from __future__ import annotations

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (  # noqa: F401  (the hooks pip calls, re-exported)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

NO_TORCH = """
turbokv: torch is not importable in this build environment.
turbokv compiles against the torch it will run with, so it does not build in pip's isolated
environment. Install torch (>= 2.11) first, then build without isolation:
    pip install torch
    pip install --no-build-isolation .          (or: pip wheel --no-build-isolation --no-deps -w dist .)
The build also needs scikit-build-core>=0.10, cmake and ninja installed in that environment.
"""


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(NO_TORCH) from None


def get_requires_for_build_wheel(config_settings=None):
    _require_torch()
    return _skbuild.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _require_torch()
    return _skbuild.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _require_torch()
    return _skbuild.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _require_torch()
    return _skbuild.build_editable(wheel_directory, config_settings, metadata_directory)
