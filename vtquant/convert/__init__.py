"""Converters that turn model files found inside registry packages into fp32 PyTorch weights.

* :mod:`vtquant.convert.clip_onnx`: an onnxruntime-quantized (int8 ``MatMulInteger``) CLIP
  vision tower -> fp32 weights for transformers, open_clip and timm.
"""
