"""Benchmarks of real low-bit execution (the kernels themselves live in :mod:`vtquant.kernels`).

* :mod:`vtquant.bench.cpu`: SmolLM2 prefill / decode speed and peak memory per method, one
  subprocess per method (``vtquant bench``);
* :mod:`vtquant.bench.gpu`: layer-shaped speed of per-tensor static vs per-token dynamic FP8 / int8
  on the GPU (``vtquant bench --device cuda``, or ``python -m vtquant.bench.gpu``).

Both take typed arguments and return measurement dicts; ``cpu_rows`` / ``gpu_rows`` turn them into
result rows (:class:`vtquant.eval.results.Row`).
"""
