"""The format registry: the one source of truth for every storage format.

A format packs one row of ``d`` values (one token of one KV head) into bytes.

* ``float`` family (``f16``, ``bf16``): uncompressed controls, 2 bytes a value.
* ``block`` family: ggml's block-32 layouts, byte-identical to the ``gguf``
  package's quantizers. ``d`` must be a multiple of 32.
* ``turbo`` family (TurboQuant's MSE quantizer): per group of ``g`` values an
  fp16 norm-corrected scale plus packed Lloyd-Max indices. Rows are first
  zero-padded to a multiple of 64 (zero padding keeps dot products); then
  ``g`` is 128 when it divides the padded width, else 64 (d = 96 -> one group
  of 128, d = 192 -> three groups of 64).

The codebooks below are computed by ``tools/gen_formats.py``, which rewrites
the generated block of this file and ``cpp/include/turbokv/formats_generated.h``
from this registry. Never edit the generated block by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """One storage format.

    ``block`` is the number of values a block covers (32 for ggml formats,
    1 for floats, 0 for turbo, whose group depends on the head dim) and
    ``block_bytes`` the bytes one block takes (turbo: see :func:`group_bytes`).
    """

    name: str
    id: int
    family: str  # "float" | "block" | "turbo"
    bits: int
    block: int
    block_bytes: int
    has_min: bool = False  # q4_1 / q5_1 store a per-block minimum

    @property
    def quantized(self) -> bool:
        return self.family != "float"


# Order fixes the numeric ids used by the C++ side; append, never reorder.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("f16", 0, "float", 16, 1, 2),
        Format("bf16", 1, "float", 16, 1, 2),
        Format("q8_0", 2, "block", 8, 32, 34),
        Format("q5_1", 3, "block", 5, 32, 24, has_min=True),
        Format("q5_0", 4, "block", 5, 32, 22),
        Format("q4_1", 5, "block", 4, 32, 20, has_min=True),
        Format("q4_0", 6, "block", 4, 32, 18),
        Format("turbo2", 7, "turbo", 2, 0, 0),
        Format("turbo3", 8, "turbo", 3, 0, 0),
        Format("turbo4", 9, "turbo", 4, 0, 0),
    )
}

TURBO_GROUPS = (64, 128)
ROTATION_GROUPS = (16, 32, 64, 128, 256, 512)


def get(name: str | Format) -> Format:
    """Look a format up by name; raises ``ValueError`` listing the valid names."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"format: got {name!r}, expected one of {sorted(FORMATS)}") from None


def turbo_group(d: int) -> int:
    """Group size g of a turbo row of stored (padded) width ``d``: 128 when it divides d, else 64."""
    return 128 if d % 128 == 0 else 64


def padded_dim(fmt: str | Format, d: int) -> int:
    """Number of values actually stored per row (turbo rows pad to 64)."""
    f = get(fmt)
    if f.family == "turbo":
        return -(-d // 64) * 64
    return d


def group_bytes(fmt: str | Format, g: int) -> int:
    """Bytes of one turbo group: fp16 scale + g*bits/8 bytes of indices."""
    return 2 + g * get(fmt).bits // 8


def check_dim(fmt: str | Format, d: int) -> None:
    """Raise ``ValueError`` when a row of ``d`` values cannot use ``fmt``."""
    f = get(fmt)
    if d <= 0:
        raise ValueError(f"head_dim: got {d}, expected a positive integer")
    if f.family == "block" and d % 32 != 0:
        raise ValueError(f"head_dim: got {d}, expected a multiple of 32 for format {f.name}")


def row_bytes(fmt: str | Format, d: int) -> int:
    """Bytes one packed row of ``d`` values takes."""
    f = get(fmt)
    check_dim(f, d)
    if f.family == "float":
        return 2 * d
    if f.family == "block":
        return d // 32 * f.block_bytes
    dp = padded_dim(f, d)
    g = turbo_group(dp)
    return dp // g * group_bytes(f, g)


def bits_per_value(fmt: str | Format, d: int) -> float:
    """Stored bits per original value, scales and padding included."""
    return 8.0 * row_bytes(fmt, d) / d


# --- BEGIN GENERATED (tools/gen_formats.py) ---
# Lloyd-Max centroids (ascending, symmetric) for one coordinate of a uniformly
# random unit vector in R^g (exact Beta marginal), keyed by (g, bits).
CODEBOOKS: dict[tuple[int, int], tuple[float, ...]] = {
    (64, 2): (
        -0.18749684942035127,
        -0.056514868764109216,
        0.056514868764109216,
        0.18749684942035127,
    ),
    (64, 3): (
        -0.26391393084464915,
        -0.1661678589252744,
        -0.09383226321841939,
        -0.030469178931189604,
        0.030469178931189604,
        0.09383226321841939,
        0.1661678589252744,
        0.26391393084464915,
    ),
    (64, 4): (
        -0.3307963113778703,
        -0.2529137282253435,
        -0.19885614111976785,
        -0.15492552779181998,
        -0.11648675232320627,
        -0.08131176852000044,
        -0.04808978320946283,
        -0.015919022553987854,
        0.015919022553987854,
        0.04808978320946283,
        0.08131176852000044,
        0.11648675232320627,
        0.15492552779181998,
        0.19885614111976785,
        0.2529137282253435,
        0.3307963113778703,
    ),
    (128, 2): (
        -0.1330415202495485,
        -0.0399915951975812,
        0.0399915951975812,
        0.1330415202495485,
    ),
    (128, 3): (
        -0.18839718597011867,
        -0.11813976699677432,
        -0.0665856080474171,
        -0.021604310642151278,
        0.021604310642151278,
        0.0665856080474171,
        0.11813976699677432,
        0.18839718597011867,
    ),
    (128, 4): (
        -0.23766382676515735,
        -0.1808359637530621,
        -0.1418051967833435,
        -0.11028836904958342,
        -0.0828284573071259,
        -0.057772298776997535,
        -0.034151570704256715,
        -0.011302496590685112,
        0.011302496590685112,
        0.034151570704256715,
        0.057772298776997535,
        0.0828284573071259,
        0.11028836904958342,
        0.1418051967833435,
        0.1808359637530621,
        0.23766382676515735,
    ),
}
# Decision thresholds between neighbouring centroids, as float32 values.
MIDPOINTS: dict[tuple[int, int], tuple[float, ...]] = {
    (64, 2): (
        -0.12200585752725601,
        0.0,
        0.12200585752725601,
    ),
    (64, 3): (
        -0.2150408923625946,
        -0.1300000548362732,
        -0.06215072050690651,
        0.0,
        0.06215072050690651,
        0.1300000548362732,
        0.2150408923625946,
    ),
    (64, 4): (
        -0.29185500741004944,
        -0.22588492929935455,
        -0.17689083516597748,
        -0.13570614159107208,
        -0.09889926016330719,
        -0.06470077484846115,
        -0.032004401087760925,
        0.0,
        0.032004401087760925,
        0.06470077484846115,
        0.09889926016330719,
        0.13570614159107208,
        0.17689083516597748,
        0.22588492929935455,
        0.29185500741004944,
    ),
    (128, 2): (
        -0.08651655912399292,
        0.0,
        0.08651655912399292,
    ),
    (128, 3): (
        -0.1532684713602066,
        -0.09236268699169159,
        -0.044094961136579514,
        0.0,
        0.044094961136579514,
        0.09236268699169159,
        0.1532684713602066,
    ),
    (128, 4): (
        -0.20924989879131317,
        -0.16132058203220367,
        -0.1260467767715454,
        -0.09655841439962387,
        -0.0703003779053688,
        -0.04596193507313728,
        -0.022727033123373985,
        0.0,
        0.022727033123373985,
        0.04596193507313728,
        0.0703003779053688,
        0.09655841439962387,
        0.1260467767715454,
        0.16132058203220367,
        0.20924989879131317,
    ),
}
# Theoretical per-vector MSE of a unit vector (mse * g), no norm correction.
MSE_G: dict[tuple[int, int], float] = {
    (64, 2): 0.11452575680882665,
    (64, 3): 0.033390834095931965,
    (64, 4): 0.009131517603555168,
    (128, 2): 0.11600007027511872,
    (128, 3): 0.03396592579390186,
    (128, 4): 0.009314787953795122,
}
# --- END GENERATED ---
