"""KL-divergence statistics in the manner of ``llama-perplexity --kl-divergence``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def token_stats(ref_logp: torch.Tensor, test_logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token quantities for ``(N, vocab)`` log-probabilities and ``(N,)`` next tokens.

    KL(ref || test), the test model's NLL, Δp = p_test(target) - p_ref(target), and whether
    the top token agrees.
    """
    ref_logp, test_logp = ref_logp.double(), test_logp.double()
    kld = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1).clamp_min(0.0)
    t = targets[:, None]
    nll = -test_logp.gather(-1, t)[:, 0]
    ref_nll = -ref_logp.gather(-1, t)[:, 0]
    dp = test_logp.gather(-1, t)[:, 0].exp() - ref_logp.gather(-1, t)[:, 0].exp()
    same = ref_logp.argmax(-1) == test_logp.argmax(-1)
    return {"kld": kld, "nll": nll, "ref_nll": ref_nll, "dp": dp, "same_top": same}


@dataclass
class Summary:
    tokens: int
    ppl: float
    ppl_ref: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    rms_dp: float
    same_top: float
    # Stored bits per K and V value at the evaluated length (TurboCache.bits_per_value: packed
    # rows, exact windows, key offsets); NaN where no cache was measured.
    k_bits: float = math.nan
    v_bits: float = math.nan

    @property
    def bits(self) -> float:
        """Mean bits per K/V value."""
        return (self.k_bits + self.v_bits) / 2

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(stats: list[dict[str, torch.Tensor]]) -> Summary:
    cat = {k: torch.cat([s[k].cpu() for s in stats]) for k in stats[0]}
    kld = cat["kld"]
    n = kld.numel()
    q = torch.quantile(kld, torch.tensor([0.5, 0.9, 0.95, 0.99, 0.999], dtype=kld.dtype))
    return Summary(
        tokens=n,
        ppl=math.exp(cat["nll"].mean().item()),
        ppl_ref=math.exp(cat["ref_nll"].mean().item()),
        kld_mean=kld.mean().item(),
        kld_stderr=(kld.std().item() / math.sqrt(n)) if n > 1 else 0.0,
        kld_median=q[0].item(),
        kld_p90=q[1].item(),
        kld_p95=q[2].item(),
        kld_p99=q[3].item(),
        kld_p999=q[4].item(),
        kld_max=kld.max().item(),
        rms_dp=cat["dp"].pow(2).mean().sqrt().item(),
        same_top=cat["same_top"].double().mean().item(),
    )


def format_summary(name: str, s: Summary) -> str:
    return "\n".join(
        [
            f"{name}: {s.tokens} scored tokens",
            f"  bits per value {s.bits:10.4f}   (K {s.k_bits:.4f}, V {s.v_bits:.4f}; windows and offsets included)",
            f"  PPL            {s.ppl:10.4f}   (f16 cache {s.ppl_ref:.4f}, ratio {s.ppl / s.ppl_ref:.4f})",
            f"  mean KLD       {s.kld_mean:10.6f} ± {s.kld_stderr:.6f}",
            f"  KLD median     {s.kld_median:10.6f}",
            f"  KLD 90/95/99   {s.kld_p90:10.6f} {s.kld_p95:.6f} {s.kld_p99:.6f}",
            f"  KLD 99.9 / max {s.kld_p999:10.6f} {s.kld_max:.6f}",
            f"  RMS Δp         {100 * s.rms_dp:9.3f} %",
            f"  same top token {100 * s.same_top:9.3f} %",
        ]
    )
