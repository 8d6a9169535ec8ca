"""Micro-benchmark of the fused ViT forward's Triton kernels on the GPU (ViT-B/16, ViT-L/14 at batch 256).

    PYTHONPATH=. python3 tools/vit_kernel_bench.py

Times (median, ``triton.testing.do_bench``) GELU -> FP8 codes (libdevice erf and the polynomial erf), the attention
output -> codes, GELU values only, the per-token dynamic peers, LayerNorm (+ residual add) -> codes, against torch's
GELU and the plain static quantizer, with the bytes each moves (GB/s).
"""
import torch
import triton

from vtquant.kernels import fused_vit as fv
from vtquant.kernels import triton_quant as tq


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def main():
    f8 = torch.float8_e4m3fn
    print(f"{'case':<44} {'us':>8} {'GB/s':>7}")
    for name, m, c, hidden in (("B/16", 256 * 197, 768, 3072), ("L/14", 256 * 257, 1024, 4096)):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16) * 2
        zero = torch.zeros(m, dtype=torch.bool, device="cuda")
        zero[::197] = True
        gb_codes = m * hidden * 3 / 1e9  # bf16 in, fp8 out
        rows = [
            ("gelu(erf libdevice) -> codes", lambda: fv.act_codes(x, "gelu", 0.01, f8, zero), gb_codes),
            ("gelu(erf poly) -> codes", lambda: fv.act_codes(x, "gelu_poly", 0.01, f8, zero), gb_codes),
            ("identity -> codes", lambda: fv.act_codes(x, "identity", 0.01, f8, zero), gb_codes),
            ("gelu(poly) values bf16", lambda: fv.act_values(x, "gelu_poly"), m * hidden * 4 / 1e9),
            ("dynamic gelu(poly) -> codes + row scale", lambda: fv.act_codes(x, "gelu_poly", None, f8), gb_codes),
            ("torch F.gelu (bf16)", lambda: torch.nn.functional.gelu(x), m * hidden * 4 / 1e9),
            ("tq.quant_static (bf16 -> fp8)", lambda: tq.quant_static(x, 0.01, f8), gb_codes),
        ]
        xc = torch.randn(m, c, device="cuda", dtype=torch.bfloat16) * 2
        yc = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
        ln = torch.nn.LayerNorm(c).cuda().bfloat16()
        norm = fv._Norm(ln)
        rows += [
            ("attn out identity -> codes", lambda: fv.act_codes(xc, "identity", 0.01, f8, zero), m * c * 3 / 1e9),
            ("attn out dynamic -> codes", lambda: fv.act_codes(xc, "identity", None, f8), m * c * 3 / 1e9),
            ("LayerNorm -> codes", lambda: fv.norm_codes(xc, norm, 0.01, f8, zero), m * c * 3 / 1e9),
            ("add + LayerNorm -> codes (+ h)", lambda: fv.norm_codes(xc, norm, 0.01, f8, zero, add=yc), m * c * 7 / 1e9),
            ("LayerNorm -> dynamic codes", lambda: fv.norm_codes(xc, norm, None, f8), m * c * 3 / 1e9),
            ("torch LayerNorm (bf16)", lambda: ln(xc), m * c * 4 / 1e9),
            ("torch add (bf16)", lambda: xc + yc, m * c * 6 / 1e9),
        ]
        for label, fn, gb in rows:
            us = bench(fn)
            print(f"{name + ' ' + label:<44} {us:8.1f} {gb / (us * 1e-6):7.0f}")


if __name__ == "__main__":
    main()
