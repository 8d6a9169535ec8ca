"""Real low-bit execution of calibrated vtquant models (issue: real kernels).

``convert_(model, backend)`` replaces every calibrated fake-quant ``QuantLinear`` by a
:class:`~vtquant.kernels.linear.RealQuantLinear` that stores int8 (or FP8) weights and
runs a real low-precision matmul with the per-tensor static activation scale and the
per-channel weight scales folded into one rescale:

* ``cpu-int8``: int8 x int8 -> int32 through ``torch._int_mm`` and one rescale pass; on CPUs with
  AMX int8 (or with ``convert_(..., cpu_kernel="onednn")``) oneDNN's int8 matmul primitive (AMX tiles
  where present, VNNI otherwise; rescale in its epilogue); with ``cpu_kernel="auto"`` fbgemm's fused
  GEMM + rescale kernel.  Each is exactness-probed once: the same codes and int32 sums;
* ``cuda-int8``: the same on the GPU;
* ``cuda-fp8``: FP8 E4M3 through ``torch._scaled_mm`` (scales fused into the matmul).

Linears that read the same input (q/k/v, gate/up) share one quantization and one
concatenated matmul when their static scales agree.  Sink rows cost O(#sinks): their
int8 codes are zeroed by index and their outputs written by index.

The blocks of a pre-norm RMSNorm / SwiGLU transformers decoder then run the
producer-fused forward of :mod:`vtquant.kernels.fused` (codes written by RMSNorm, SiLU * up
and the attention output; one GEMM per fused group; SDPA; the rotated model's online
Hadamard fused with SiLU * up and the quantization, :mod:`vtquant.kernels.triton_hadamard` on
CUDA, :mod:`vtquant.kernels.cpu_quant` on the CPU); on CUDA the pre-norm LayerNorm / GELU blocks of
timm and open_clip ViTs run :mod:`vtquant.kernels.fused_vit` (LayerNorm / GELU / attention output ->
codes, q/k/v one GEMM, the sinks' template or full-precision rows by index).
"""
from .linear import BACKENDS, RealQuantLinear, convert_

__all__ = ["BACKENDS", "RealQuantLinear", "convert_"]
