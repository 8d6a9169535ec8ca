"""Linear-probe and k-NN top-1 of image encoders (FP and quantized) on a labelled image set.

The protocol (CLIP paper section 3.2 linear probes; DINO's weighted-free k-NN variant):

* every model sees the same images, each turned into its own input by its ``pixels`` function
  (grayscale -> upscaled to the model's size, 3 channels, the model's normalization);
* features are L2-normalized; a multinomial logistic-regression probe is fit on the *reference*
  model's (the first model, FP) training features, standardized with their mean / std, by
  full-batch L-BFGS with an L2 penalty (torch only: no scikit-learn);
* **linear-probe top-1**: the probe fit on FP features, standardization included, applied to each
  model's test features (a quantized model is scored by how well its features still fit the FP
  probe);
* **k-NN top-1**: each model's own train features as the memory; cosine similarity, the ``k``
  nearest vote with one vote each, ties go to the tied class with the larger summed similarity.

Rows come out as :class:`vtquant.eval.results.Row` (``linear_probe_top1`` and ``knn{k}_top1``, %).
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .results import Row

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
PixelFn = Callable[[np.ndarray], torch.Tensor]


@dataclasses.dataclass
class ProbeModel:
    """One image encoder under evaluation.

    Attributes:
        method: row label (``fp`` for the reference, or the quantization method).
        features: ``pixels [B, 3, S, S] -> features [B, D]`` (the caller's no-grad forward).
        pixels: ``uint8 images [B, H, W] or [B, H, W, 3] -> pixels [B, 3, S, S]``, e.g. :func:`gray_pixels`.
        w_bits, a_bits, act_granularity, static: the quantization, for the row (``None`` = fp).
        extra: more row fields.
    """

    method: str
    features: FeatureFn
    pixels: PixelFn
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    act_granularity: Optional[str] = None
    static: Optional[bool] = None
    extra: dict = dataclasses.field(default_factory=dict)
    build: Optional[Callable[["ProbeModel"], FeatureFn]] = None
    """Built just before its features are extracted (a quantized copy made then, freed after: one copy
    in memory at a time); returns the feature function and may add to ``extra`` (the calibration)."""


def gray_pixels(size: int, mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bicubic") -> PixelFn:
    """uint8 images ``[B, H, W]`` (or ``[B, H, W, 3]``) -> ``[B, 3, size, size]``: scale to [0, 1], resize
    (bicubic, clamped to [0, 1] like PIL's), repeat the gray channel, normalize with ``mean`` / ``std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def run(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (size, size):
            kwargs = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
            x = F.interpolate(x, size=(size, size), mode=interpolation, **kwargs).clamp_(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - m) / s

    return run


def pil_pixels(preprocess: Callable[[Any], torch.Tensor]) -> PixelFn:
    """Apply a model's own PIL transform (timm / open_clip / HF processor) image by image."""
    from PIL import Image

    def run(images: np.ndarray) -> torch.Tensor:
        return torch.stack([preprocess(Image.fromarray(img).convert("RGB")) for img in images])

    return run


@torch.no_grad()
def extract_features(model: ProbeModel, images: np.ndarray, *, batch_size: int = 64, device: str = "cpu",
                     quiet: bool = False, desc: str = "features") -> torch.Tensor:
    """``[N, D]`` float32 CPU features of ``images`` (pixels made batch by batch: never all at once)."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=quiet, leave=False):
        x = model.pixels(images[start:start + batch_size]).to(device)
        out.append(model.features(x).float().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


@dataclasses.dataclass
class LinearProbe:
    """A multinomial logistic-regression probe on L2-normalized, standardized features."""

    mean: torch.Tensor    # [D], of the reference train features after L2 normalization
    std: torch.Tensor     # [D]
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor    # [C]
    train_top1: float = float("nan")
    weight_decay: float = 0.0
    iterations: int = 0

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.to(self.weight.dtype), dim=-1)
        return (x - self.mean) / self.std

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.prepare(features) @ self.weight.T + self.bias

    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in %."""
        pred = self.logits(features).argmax(-1)
        return 100.0 * float((pred == torch.as_tensor(labels).to(pred.device)).double().mean())


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: Optional[int] = None,
                     weight_decay: float = 1e-3, max_iter: int = 300, tol: float = 1e-9) -> LinearProbe:
    """Fit a logistic-regression probe by full-batch L-BFGS (float64).

    Minimizes ``mean cross-entropy + weight_decay / 2 * |W|^2`` over ``W [C, D]``, ``b [C]`` on the
    L2-normalized features standardized with their own mean / std.

    Args:
        features: ``[N, D]`` training features of the reference model.
        labels: ``[N]`` integer classes.
        num_classes: default ``max(labels) + 1``.
        weight_decay: the L2 penalty on ``W`` (not on ``b``).
        max_iter: L-BFGS iterations.
        tol: stop when the loss changes less than this.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    c = int(num_classes if num_classes is not None else labels.max() + 1)
    x = F.normalize(features.double(), dim=-1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_change=tol, tolerance_grad=1e-7,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, labels) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    probe = LinearProbe(mean, std, w.detach(), b.detach(), weight_decay=weight_decay,
                        iterations=int(state.get("n_iter", 0)))
    probe.train_top1 = probe.top1(features, labels)
    return probe


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor, *,
                k: int = 20, num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """k-NN class of each query: cosine similarity, one vote per neighbour among the ``k`` nearest,
    ties to the tied class with the larger summed similarity.  Chunked over queries."""
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    c = int(num_classes if num_classes is not None else train_labels.max() + 1)
    k = min(k, len(train_features))
    memory = F.normalize(train_features.float(), dim=-1)
    out = []
    for start in range(0, len(query_features), chunk):
        q = F.normalize(query_features[start:start + chunk].float(), dim=-1)
        sims, idx = (q @ memory.T).topk(k, dim=-1)
        neigh = train_labels[idx]  # [q, k]
        votes = torch.zeros(len(q), c).scatter_add_(1, neigh, torch.ones_like(sims))
        sim_sum = torch.zeros(len(q), c, dtype=torch.float64).scatter_add_(1, neigh, sims.double())
        # votes dominate: |summed similarity| <= k, scaled below 1/2, only breaks ties
        score = votes.double() + sim_sum / (2.0 * k + 1.0)
        out.append(score.argmax(-1))
    return torch.cat(out)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, *, k: int = 20, num_classes: Optional[int] = None) -> float:
    """k-NN top-1 accuracy in % (see :func:`knn_predict`)."""
    pred = knn_predict(train_features, train_labels, test_features, k=k, num_classes=num_classes)
    return 100.0 * float((pred == torch.as_tensor(test_labels, dtype=torch.long)).double().mean())


def evaluate_linear_probe(models: Sequence[ProbeModel], train_images: np.ndarray, train_labels: np.ndarray,
                          test_images: np.ndarray, test_labels: np.ndarray, *, model_name: str,
                          dataset: str = "fashion-mnist", k: int = 20, weight_decay: float = 1e-3,
                          max_iter: int = 300, batch_size: int = 64, device: str = "cpu", quiet: bool = False,
                          log: Callable[[str], None] = print) -> list[Row]:
    """Linear-probe top-1 (probe fit on the first model's features) and k-NN top-1 of every model.

    Args:
        models: the reference (FP) first, then any others (quantized copies).
        train_images, train_labels: the probe's training set (uint8 images, int labels).
        test_images, test_labels: the evaluation set.
        model_name: the ``model`` field of the rows.
        k: neighbours of the k-NN classifier.
        weight_decay, max_iter: see :func:`fit_linear_probe`.
        batch_size, device: feature extraction.

    Returns:
        Two rows per model: ``linear_probe_top1`` and ``knn{k}_top1`` (%), ``seconds`` = that model's
        feature extraction + scoring; ``extra`` holds the dataset, the split sizes and the reference.
    """
    if not models:
        raise ValueError("evaluate_linear_probe: no models")
    ytr, yte = torch.as_tensor(train_labels, dtype=torch.long), torch.as_tensor(test_labels, dtype=torch.long)
    num_classes = int(max(ytr.max(), yte.max()) + 1)
    common = {"dataset": dataset, "train_images": len(train_images), "test_images": len(test_images),
              "reference": models[0].method, "k": k}
    rows, probe = [], None
    for model in models:
        t0 = time.time()
        built = model
        if model.build is not None:
            built = dataclasses.replace(model, features=model.build(model), build=None)
        ftr = extract_features(built, train_images, batch_size=batch_size, device=device, quiet=quiet,
                               desc=f"{model.method} train")
        fte = extract_features(built, test_images, batch_size=batch_size, device=device, quiet=quiet,
                               desc=f"{model.method} test")
        if model.build is not None:  # a built (quantized) copy is freed before the next one is made
            del built
            gc.collect()  # its reference cycles (handle <-> adapter <-> model) hold the weights otherwise
        extra = dict(common, feature_dim=int(ftr.shape[1]), **model.extra)
        if probe is None:
            tp = time.time()
            probe = fit_linear_probe(ftr, ytr, num_classes=num_classes, weight_decay=weight_decay, max_iter=max_iter)
            log(f"probe fit on {model.method} features: {len(ftr)} x {ftr.shape[1]}, train top-1 "
                f"{probe.train_top1:.2f}%, {probe.iterations} L-BFGS iterations, {time.time() - tp:.1f} s")
            extra.update(probe_train_top1=round(probe.train_top1, 3), probe_weight_decay=weight_decay)
        lp = probe.top1(fte, yte)
        kn = knn_top1(ftr, ytr, fte, yte, k=k, num_classes=num_classes)
        seconds = time.time() - t0
        for metric, value in (("linear_probe_top1", lp), (f"knn{k}_top1", kn)):
            rows.append(Row(model=model_name, method=model.method, w_bits=model.w_bits, a_bits=model.a_bits,
                            act_granularity=model.act_granularity, static=model.static, metric=metric,
                            value=value, seconds=seconds, extra=dict(extra)))
        log(f"{model.method}: linear-probe top-1 {lp:.2f}%, {k}-NN top-1 {kn:.2f}% ({seconds:.0f} s)")
    return rows


# ------------------------------------------------------------------------------------------
# `vtquant eval linear-probe`: Fashion-MNIST, FP and (with a recipe) a quantized copy
# ------------------------------------------------------------------------------------------
CLIP_ASSET_SPEC = "asset:clip-vit-b16-openai"


@dataclasses.dataclass
class _Encoder:
    model: Any             # the whole module (features are read from it)
    tower: Any             # the image tower that quantize_ works on (a submodule of model, or model)
    features: Callable[[Any, torch.Tensor], torch.Tensor]
    pixels: PixelFn
    name: str


def _load_encoder(spec: str, library: str, pretrained: bool, device: str, quiet: bool) -> _Encoder:
    """The image encoder named by ``spec``: the CLIP asset (in ``library``) or ``timm:`` / ``open_clip:`` / ``hf:``."""
    if spec.startswith("asset:"):
        if spec != CLIP_ASSET_SPEC:
            from ..config import ConfigError

            raise ConfigError(f"--model {spec!r}: the linear probe takes {CLIP_ASSET_SPEC}, timm:NAME, "
                              "open_clip:NAME/PRETRAINED or hf:PATH")
        from ..convert.clip_onnx import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_embeds, load_clip_vit_b16

        model = load_clip_vit_b16(library, quiet=quiet).to(device)  # type: ignore[arg-type]
        tower = model.vision_model if library == "hf" else model
        return _Encoder(model, tower, image_embeds, gray_pixels(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                        f"clip-vit-b16-openai ({library}; FP = dequantized int8)")
    from ..vision import load_vision_model, model_encoders

    vm = load_vision_model(spec, pretrained=pretrained, device=device)
    model = vm.model
    if vm.library == "open_clip":
        return _Encoder(model, model.visual, lambda m, x: m.encode_image(x), pil_pixels(vm.preprocess), vm.name)
    if vm.library == "hf":
        if vm.is_clip:
            encode_image = model_encoders(model)[0]  # the adapter's image encoder (pooled, projected)
            return _Encoder(model, model.vision_model, lambda m, x: encode_image(x), pil_pixels(vm.preprocess),
                            vm.name)

        def hf_feats(m: Any, x: torch.Tensor) -> torch.Tensor:
            out = m(pixel_values=x)
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state[:, 0]

        return _Encoder(model, model, hf_feats, pil_pixels(vm.preprocess), vm.name)
    return _Encoder(model, model, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                    pil_pixels(vm.preprocess), vm.name)


def probe_recipes(model: str, library: str, recipe: Optional[Any], methods: Optional[Sequence[str]],
                  w_bits: int = 8, a_bits: int = 8) -> list:
    """The quantized recipes a probe run scores: ``recipe`` as written when no ``methods`` are given; else
    each of ``methods`` derived from ``recipe`` (default: the shipped CLIP recipe of ``library`` for the
    CLIP asset, :func:`vtquant.vision.default_vision_recipe` otherwise) at ``w_bits`` / ``a_bits``.
    ``fp`` in ``methods`` is the reference, always scored first, and not repeated."""
    from ..config import METHOD_NAMES, ConfigError, method_recipe

    if isinstance(recipe, (str, bytes)) or hasattr(recipe, "__fspath__"):
        from ..recipe import load_recipe

        recipe = load_recipe(recipe)
    if not methods:
        return [recipe] if recipe is not None else []
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from {list(METHOD_NAMES)}")
    if recipe is None:
        if model == CLIP_ASSET_SPEC:
            from .vision_compare import clip_recipe

            recipe = clip_recipe(library)
        else:
            from ..vision import default_vision_recipe

            recipe = default_vision_recipe()
    names = list(dict.fromkeys(m for m in methods if m != "fp"))
    return [method_recipe(m, recipe, w_bits=w_bits, a_bits=a_bits) for m in names]


def set_tf32(device: str, allow: bool = False) -> Optional[bool]:
    """On a CUDA device: allow / forbid TF32 matmuls and convolutions (fp32 features need it off); returns
    the setting (``None`` off-GPU)."""
    if not str(device).startswith("cuda"):
        return None
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    return allow


def run_fashion_mnist_probe(model: str = CLIP_ASSET_SPEC, *, library: str = "hf", pretrained: bool = True,
                            data_dir: Optional[str] = None, train_size: Optional[int] = 10000,
                            test_size: Optional[int] = 2000, seed: int = 0, k: int = 20,
                            recipe: Optional[Any] = None, methods: Optional[Sequence[str]] = None,
                            w_bits: int = 8, a_bits: int = 8, batch_size: int = 64, device: str = "cpu",
                            tf32: bool = False, weight_decay: float = 1e-3, quiet: bool = False,
                            log: Callable[[str], None] = print) -> tuple[list[Row], dict]:
    """Fashion-MNIST linear-probe and k-NN top-1 of an image encoder, FP and quantized copies.

    Args:
        model: ``asset:clip-vit-b16-openai`` (the real CLIP ViT-B/16), ``timm:NAME``,
            ``open_clip:NAME/PRETRAINED`` or ``hf:PATH``.
        library: for the CLIP asset: ``hf``, ``open_clip`` or ``timm``.
        pretrained: ``False`` for random weights (smoke tests).
        data_dir: a directory with the four idx files (default: the ``fashion-mnist`` asset).
        train_size, test_size: seeded random subsets of the 60k / 10k splits (``None`` = all).
        seed: the subset seed.
        k: k-NN neighbours.
        recipe: a :class:`~vtquant.config.Recipe` or a YAML path: its image tower is quantized on a
            copy, calibrated on ``calibration.num_samples`` training images outside the probe's
            subset, and evaluated with the FP probe.
        methods: score each of these methods instead (:func:`probe_recipes`: derived from ``recipe``
            or the default recipe, at ``w_bits`` / ``a_bits``); each one a fresh copy of the FP tower,
            all calibrated on the same images, made just before its features and freed after.
        batch_size, device: feature extraction; calibration and fake quantization run where the
            model is (``device``), in float32.
        tf32: on CUDA, allow TF32 (default off: fp32 matmuls, as the FP reference numbers).
        weight_decay: the probe's L2 penalty.

    Returns:
        ``(rows, meta)``: :func:`evaluate_linear_probe` rows and a dict with the protocol.
    """
    import copy

    from .fashion_mnist import load_fashion_mnist, sample, subset_indices

    recipes = probe_recipes(model, library, recipe, methods, w_bits, a_bits)  # bad names fail before any load
    tf32_state = set_tf32(device, tf32)
    train_all, ytrain_all = load_fashion_mnist("train", root=data_dir, quiet=quiet)
    test_all, ytest_all = load_fashion_mnist("test", root=data_dir, quiet=quiet)
    x_train, y_train = sample(train_all, ytrain_all, train_size, seed)
    x_test, y_test = sample(test_all, ytest_all, test_size, seed)
    enc = _load_encoder(model, library, pretrained, device, quiet)
    log(f"{enc.name}: Fashion-MNIST {len(x_train)} train / {len(x_test)} test images (seed {seed})")

    def probe_model(method: str, m: Any, **row: Any) -> ProbeModel:
        def features(x: torch.Tensor) -> torch.Tensor:
            return enc.features(m, x)

        return ProbeModel(method=method, features=features, pixels=enc.pixels, **row)

    models = [probe_model("fp", enc.model)]
    meta: dict = {"model": enc.name, "dataset": "fashion-mnist", "train_images": len(x_train),
                  "test_images": len(x_test), "seed": seed, "k": k, "device": device,
                  "dtype": str(next(enc.model.parameters()).dtype).replace("torch.", ""),
                  "protocol": "probe: multinomial logistic regression (L-BFGS, L2 "
                              f"{weight_decay:g}) on L2-normalized, standardized FP train features, applied to each "
                              f"model's test features; k-NN: cosine, k={k}, one vote each, each model's own train "
                              "features; images: 28x28 gray upscaled to the model's size, 3 channels, its normalization"}
    if tf32_state is not None:
        meta["tf32"] = tf32_state
    if recipes:
        from ..adapters import get_adapter
        from ..api import quantize_
        from ..vision import tower_recipe

        cal = recipes[0].calibration
        in_subset = set(subset_indices(len(train_all), train_size, seed).tolist())
        pool = np.array([i for i in np.random.default_rng(seed + 1).permutation(len(train_all)) if i not in in_subset])
        calib_idx = pool[: cal.num_samples]
        calib = [enc.pixels(train_all[calib_idx[s:s + cal.batch_size]]).to(device)
                 for s in range(0, len(calib_idx), cal.batch_size)]
        meta["calibration"] = (f"{len(calib_idx)} Fashion-MNIST training images outside the probe subset (the same "
                               "for every method)")
        meta["calibration_indices"] = [int(i) for i in calib_idx]
        meta["reports"] = {}

        def quantized_features(rec: Any) -> Callable[[ProbeModel], FeatureFn]:
            def build(pm: ProbeModel) -> FeatureFn:
                qmodel = copy.deepcopy(enc.model)
                qtower = qmodel if enc.tower is enc.model else _same_submodule(enc.model, enc.tower, qmodel)
                adapter = get_adapter(qtower)
                t0 = time.time()
                report = quantize_(qtower, tower_recipe(rec, adapter), calib, adapter=adapter, quiet=quiet)
                seconds = time.time() - t0
                log(f"quantized {rec.display_method} W{rec.weights.bits if rec.weights else 'fp'}"
                    f"A{rec.activations.bits if rec.activations else 'fp'} on {len(calib_idx)} training images "
                    f"outside the probe subset ({seconds:.0f} s)")
                pm.extra["calib_seconds"] = round(seconds, 1)
                meta["reports"][rec.display_method] = report.to_dict()
                return lambda x: enc.features(qmodel, x)

            return build

        for rec in recipes:
            act = rec.activations
            models.append(ProbeModel(method=rec.display_method, features=_unbuilt, pixels=enc.pixels,
                                     w_bits=rec.weights.bits if rec.weights else None,
                                     a_bits=act.bits if act else None,
                                     act_granularity=act.granularity if act else None,
                                     static=act.static if act else None, extra={"recipe": rec.name},
                                     build=quantized_features(rec)))
    rows = evaluate_linear_probe(models, x_train, y_train, x_test, y_test, model_name=enc.name, k=k,
                                 weight_decay=weight_decay, batch_size=batch_size, device=device, quiet=quiet, log=log)
    return rows, meta


def _unbuilt(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("a quantized ProbeModel is built by evaluate_linear_probe before use")


def _same_submodule(root: Any, sub: Any, other_root: Any) -> Any:
    """The submodule of ``other_root`` at the path where ``sub`` sits in ``root``."""
    for name, module in root.named_modules():
        if module is sub:
            return other_root.get_submodule(name)
    raise ValueError("the image tower is not a submodule of the model")
