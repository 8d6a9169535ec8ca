"""Fashion-MNIST idx parsing, the Debian asset cache, the linear probe and k-NN (synthetic data, no download)."""
from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vtquant import assets, assets_deb
from vtquant.fileio import sha256_file
from vtquant.eval import fashion_mnist as fm
from vtquant.eval import linear_probe as lp


# --------------------------------------------------------------------------- idx fixtures (the real format)
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """idx: magic ``0 0 <type> <ndim>``, big-endian uint32 sizes, then the data (here uint8)."""
    assert array.dtype == np.uint8
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_fashion_fixture(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> Path:
    """Four idx files in the Fashion-MNIST layout; class c images are bright in row band c (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 6, :] = 250
        img_name, lab_name = fm.FILES[split]
        write_idx(root / img_name, images)
        write_idx(root / lab_name, labels)
    return root


def test_read_idx_real_format(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([9, 0, 3], dtype=np.uint8)
    for gz in (True, False):
        img = write_idx(tmp_path / f"img{gz}", images, gz)
        lab = write_idx(tmp_path / f"lab{gz}", labels, gz)
        if gz:
            img = img.rename(img.with_suffix(".gz"))
            lab = lab.rename(lab.with_suffix(".gz"))
        np.testing.assert_array_equal(fm.read_idx(img), images)
        np.testing.assert_array_equal(fm.read_idx(lab), labels)
    # the header of the real train-labels file: magic 2049, 60000 items
    header = (tmp_path / "labFalse").read_bytes()[:8]
    assert header == bytes([0, 0, 8, 1, 0, 0, 0, 3])
    big = tmp_path / "big"
    big.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 2) + np.array([1, -2], dtype=">i4").tobytes())
    np.testing.assert_array_equal(fm.read_idx(big), [1, -2])


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an idx"):
        fm.read_idx(bad)
    short = write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), gz=False)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        fm.read_idx(short)
    code = tmp_path / "code"
    code.write_bytes(b"\0\0\x07\x01\0\0\0\x01x")
    with pytest.raises(ValueError, match="type code"):
        fm.read_idx(code)


def test_load_fashion_mnist_from_folder(tmp_path: Path) -> None:
    root = make_fashion_fixture(tmp_path / "fm")
    x, y = fm.load_fashion_mnist("train", root=root)
    assert x.shape == (30, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == [i % 10 for i in range(30)]
    xs, ys = fm.sample(x, y, 7, seed=3)
    idx = fm.subset_indices(30, 7, seed=3)
    assert len(xs) == 7 and np.array_equal(ys, y[idx]) and np.all(np.diff(idx) > 0)
    assert fm.sample(x, y, None)[0] is x
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("val", root=root)


# --------------------------------------------------------------------------- the Debian asset
def _fake_deb(path: Path, members: dict[str, bytes]) -> Path:
    """A real-format .deb: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    def tar_xz(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
             ("data.tar.xz", tar_xz({f"./{k}": v for k, v in members.items()}))]
    out = b"!<arch>\n"
    for name, data in parts:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    path.write_bytes(out)
    return path


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("VTQUANT_HOME", str(home))
    src = make_fashion_fixture(tmp_path / "src")
    real = assets_deb.DEB_ASSETS["fashion-mnist"]
    members = {m: (src / Path(m).name).read_bytes() for m in real.members}
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = _fake_deb(debs / real.deb_name, members)
    pinned = assets_deb.DebAsset(real.name, real.package, real.version, sha256_file(deb),
                                 {m: sha256_file(src / Path(m).name) for m in real.members}, real.description)
    monkeypatch.setitem(assets_deb.DEB_ASSETS, "fashion-mnist", pinned)
    monkeypatch.setattr(assets_deb.subprocess, "run", lambda *a, **k: pytest.fail(f"subprocess called: {a}"))
    return home, debs, deb, src


def test_deb_asset_from_archive_dir(fake_fashion, monkeypatch: pytest.MonkeyPatch) -> None:
    home, debs, _, src = fake_fashion
    monkeypatch.setenv("VTQUANT_ASSET_ARCHIVES", str(debs))
    assert not assets_deb.is_deb_cached("fashion-mnist")
    root = assets_deb.fetch_deb("fashion-mnist", quiet=True)
    assert root == home / "fashion-mnist" and assets_deb.is_deb_cached("fashion-mnist")
    assert sorted(p.name for p in root.iterdir()) == sorted(["asset.json", *(f for pair in fm.FILES.values() for f in pair)])
    assert json.loads((root / "asset.json").read_text())["version"] == "0.0~git20200523.55506a9-1"
    x, y = fm.load_fashion_mnist("test", root=None, quiet=True)  # through the cache
    np.testing.assert_array_equal(x, fm.read_idx(src / "t10k-images-idx3-ubyte.gz"))
    assert [p.name for p in home.iterdir()] == ["fashion-mnist"]  # no temporary left


def test_deb_asset_checksums(fake_fashion, monkeypatch: pytest.MonkeyPatch) -> None:
    home, debs, deb, _ = fake_fashion
    asset = assets_deb.DEB_ASSETS["fashion-mnist"]
    bad_member = dict(asset.members)
    first = next(iter(bad_member))
    bad_member[first] = "0" * 64
    monkeypatch.setitem(assets_deb.DEB_ASSETS, "fashion-mnist",
                        assets_deb.DebAsset(asset.name, asset.package, asset.version, asset.sha256, bad_member,
                                            asset.description))
    with pytest.raises(assets.AssetChecksumError, match="member"):
        assets_deb.add_deb_archive("fashion-mnist", deb, quiet=True)
    assert not (home / "fashion-mnist").exists() and [p.name for p in home.iterdir()] == []
    monkeypatch.setitem(assets_deb.DEB_ASSETS, "fashion-mnist",
                        assets_deb.DebAsset(asset.name, asset.package, asset.version, "f" * 64, asset.members,
                                            asset.description))
    with pytest.raises(assets.AssetChecksumError, match="expected sha256"):
        assets_deb.add_deb_archive("fashion-mnist", deb, quiet=True)


def test_apt_failure_names_the_manual_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)

    def fake_run(cmd, **kwargs):
        assert cmd[:2] == ["apt-get", "download"] and cmd[2] == "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
        return subprocess.CompletedProcess(cmd, 100, stdout="E: Unable to locate package\n")

    monkeypatch.setattr(assets_deb.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetUnavailableError) as err:
        assets_deb.fetch_deb("fashion-mnist", quiet=True)
    assert "VTQUANT_ASSET_ARCHIVES" in str(err.value) and "exit status 100" in str(err.value)
    assert [p.name for p in (tmp_path / "home").iterdir()] == []


@pytest.mark.network
def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)
    x, y = fm.load_fashion_mnist("train", quiet=True)
    assert x.shape == (60000, 28, 28) and np.bincount(y).tolist() == [6000] * 10
    x, y = fm.load_fashion_mnist("test", quiet=True)
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10


# --------------------------------------------------------------------------- probe and k-NN
def _clusters(n_per: int, classes: int, dim: int, seed: int, spread: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def _reference_probe(x: torch.Tensor, y: torch.Tensor, c: int, wd: float, steps: int = 6000, lr: float = 0.5):
    """Naive full-batch gradient descent on the same objective (float64)."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    x = (x - x.mean(0)) / x.std(0)
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * wd * (w * w).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
    return w.detach(), b.detach()


def test_probe_matches_gradient_descent_reference() -> None:
    x, y = _clusters(40, 4, 8, seed=0, spread=1.5)
    probe = lp.fit_linear_probe(x, y, weight_decay=0.05)
    w, b = _reference_probe(x, y, 4, 0.05)
    torch.testing.assert_close(probe.weight, w, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(probe.bias, b, atol=2e-4, rtol=1e-3)
    xt, yt = _clusters(25, 4, 8, seed=0, spread=1.5)
    ref_pred = (((torch.nn.functional.normalize(xt.double(), dim=-1) - probe.mean) / probe.std) @ w.T + b).argmax(-1)
    assert probe.top1(xt, yt) == pytest.approx(100.0 * float((ref_pred == yt).double().mean()))


def test_probe_separable_data() -> None:
    x, y = _clusters(50, 5, 16, seed=1)
    probe = lp.fit_linear_probe(x, y)
    assert probe.train_top1 == 100.0
    xt, yt = _clusters(20, 5, 16, seed=1)  # same centers, new noise
    assert probe.top1(xt, yt) == 100.0


def _reference_knn(train: torch.Tensor, ytr: torch.Tensor, query: torch.Tensor, k: int) -> list[int]:
    out = []
    for q in query:
        sims = [float(torch.dot(q, t) / (q.norm() * t.norm())) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes: dict[int, int] = {}
        total: dict[int, float] = {}
        for i in order:
            c = int(ytr[i])
            votes[c] = votes.get(c, 0) + 1
            total[c] = total.get(c, 0.0) + sims[i]
        best = max(votes.values())
        out.append(max((c for c in votes if votes[c] == best), key=lambda c: total[c]))
    return out


@pytest.mark.parametrize("k", [1, 4, 20])
def test_knn_matches_naive_reference(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    train, ytr = torch.randn(60, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    query = torch.randn(25, 6, generator=gen)
    pred = lp.knn_predict(train, ytr, query, k=k, chunk=7)
    assert pred.tolist() == _reference_knn(train, ytr, query, k)
    x, y = _clusters(30, 4, 10, seed=2)
    xq, yq = _clusters(10, 4, 10, seed=2)
    assert lp.knn_top1(x, y, xq, yq, k=k) == 100.0


def test_gray_pixels() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    fn = lp.gray_pixels(32, mean, std)
    images = np.full((2, 28, 28), 255, np.uint8)
    x = fn(images)
    assert x.shape == (2, 3, 32, 32)
    for ch in range(3):
        torch.testing.assert_close(x[:, ch], torch.full((2, 32, 32), (1 - mean[ch]) / std[ch]))
    assert lp.gray_pixels(28, mean, std)(np.zeros((1, 28, 28, 3), np.uint8)).shape == (1, 3, 28, 28)


def test_evaluate_linear_probe_rows(one_thread) -> None:
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 12, generator=gen)
    x_train = rng.integers(0, 30, size=(40, 8, 8)).astype(np.uint8)
    y_train = np.arange(40) % 4
    x_train[np.arange(40), y_train, :] = 255  # class c: bright row c
    x_test = rng.integers(0, 30, size=(12, 8, 8)).astype(np.uint8)
    y_test = np.arange(12) % 4
    x_test[np.arange(12), y_test, :] = 255
    pixels = lp.gray_pixels(8, (0.5,) * 3, (0.5,) * 3)

    def fp(x):
        return x.flatten(1) @ proj

    def noisy(x):
        return fp(x) + 0.1 * torch.randn(len(x), 12, generator=torch.Generator().manual_seed(1))

    models = [lp.ProbeModel("fp", fp, pixels), lp.ProbeModel("noisy", noisy, pixels, w_bits=8, a_bits=8,
                                                               act_granularity="per-tensor", static=True)]
    rows = lp.evaluate_linear_probe(models, x_train, y_train, x_test, y_test, model_name="toy", k=5,
                                    batch_size=16, quiet=True, log=lambda m: None)
    assert [(r.method, r.metric) for r in rows] == [("fp", "linear_probe_top1"), ("fp", "knn5_top1"),
                                                    ("noisy", "linear_probe_top1"), ("noisy", "knn5_top1")]
    assert rows[2].w_bits == 8 and rows[2].static is True and rows[0].w_bits is None
    assert rows[0].extra["train_images"] == 40 and rows[0].extra["reference"] == "fp"
    feats_tr = lp.extract_features(models[0], x_train, batch_size=7, quiet=True)
    feats_te = lp.extract_features(models[0], x_test, batch_size=7, quiet=True)
    assert rows[1].value == pytest.approx(lp.knn_top1(feats_tr, torch.as_tensor(y_train), feats_te,
                                                      torch.as_tensor(y_test), k=5))
    probe = lp.fit_linear_probe(feats_tr, torch.as_tensor(y_train))
    assert rows[0].value == pytest.approx(probe.top1(feats_te, torch.as_tensor(y_test)))
    assert rows[0].value == 100.0


def test_cli_linear_probe_timm(tmp_path: Path, one_thread) -> None:
    pytest.importorskip("timm")
    from vtquant.cli import main

    data = make_fashion_fixture(tmp_path / "fm", n_train=16, n_test=6)
    recipe = tmp_path / "r.yaml"
    text = Path("recipes/timm/deit_small_patch16_224.yaml").read_text()
    recipe.write_text(text.replace("num_samples: 32", "num_samples: 4").replace("batch_size: 8", "batch_size: 4"))
    out = tmp_path / "rows.json"
    rc = main(["eval", "linear-probe", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--data", str(data),
               "--train-size", "12", "--test-size", "0", "--knn-k", "3", "--recipe", str(recipe), "--batch-size", "6",
               "--threads", "1", "--quiet", "--results-file", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [(r["method"], r["metric"]) for r in result["rows"]] == [
        ("fp", "linear_probe_top1"), ("fp", "knn3_top1"), ("insertquant", "linear_probe_top1"),
        ("insertquant", "knn3_top1")]
    assert all(r["train_images"] == 12 and r["test_images"] == 6 and 0 <= r["value"] <= 100 for r in result["rows"])
    assert result["calibration"].startswith("4 ") and "insertquant" in result["reports"]


def _tiny_clip_asset(monkeypatch: pytest.MonkeyPatch, calls: dict):
    """Replace the CLIP asset by a tiny random CLIPVisionModelWithProjection (224 px, 32-px patches) that counts
    the forwards of the FP instance (quantized copies are deep copies: their calls are not counted)."""
    transformers = pytest.importorskip("transformers")
    import vtquant.convert.clip_onnx as co

    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=224, patch_size=32, projection_dim=16)
    fp = transformers.CLIPVisionModelWithProjection(cfg).eval()
    fp.register_forward_hook(lambda m, i, o: calls.__setitem__("fp", calls.get("fp", 0) + (m is fp)))

    def fake_load(library="hf", quiet=False, onnx_path=None):
        assert library == "hf"
        return fp

    monkeypatch.setattr(co, "load_clip_vit_b16", fake_load)
    return fp


def _probe_methods_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str) -> tuple[dict, dict]:
    from vtquant.cli import main

    calls: dict = {}
    _tiny_clip_asset(monkeypatch, calls)
    data = make_fashion_fixture(tmp_path / "fm", n_train=50, n_test=8)
    out = tmp_path / "rows.json"
    rc = main(["eval", "linear-probe", "--data", str(data), "--train-size", "12", "--test-size", "0", "--knn-k", "3",
               "--methods", "naive-static,dynamic-token,insertquant,insertquant+rotate", "--batch-size", "6",
               "--device", device, "--threads", "1", "--quiet", "--results-file", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), calls


def test_cli_linear_probe_several_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    result, calls = _probe_methods_run(tmp_path, monkeypatch, "cpu")
    methods = ["fp", "naive-static", "dynamic-token", "insertquant", "insertquant+rotate"]
    assert [(r["method"], r["metric"]) for r in result["rows"]] == [
        (m, metric) for m in methods for metric in ("linear_probe_top1", "knn3_top1")]
    assert calls["fp"] == 2 + 2  # FP features once: 12 train + 8 test images in batches of 6
    # calibration: the default CLIP recipe's 32 images, outside the probe's 12, the same for every method
    from vtquant.eval.fashion_mnist import subset_indices

    calib = result["calibration_indices"]
    assert len(calib) == 32 and not set(calib) & set(subset_indices(50, 12, 0).tolist())
    assert sorted(result["reports"]) == sorted(methods[1:])
    assert all(r["calib_seconds"] >= 0 for r in result["rows"] if r["method"] != "fp")
    assert all("calib_seconds" not in r for r in result["rows"] if r["method"] == "fp")
    assert all(r["recipe"].startswith(r["method"]) for r in result["rows"] if r["method"] != "fp")
    by = {r["method"]: r for r in result["rows"] if r["metric"] == "linear_probe_top1"}
    assert by["dynamic-token"]["static"] is False and by["insertquant"]["static"] is True
    rot = result["reports"]["insertquant+rotate"]
    assert "rotation" in rot["equivalence"] and rot["equivalence"]["rotation"]["residual_folded"]
    assert result["device"] == "cpu" and result["dtype"] == "float32" and "tf32" not in result


def test_linear_probe_methods_bad_name(tmp_path: Path) -> None:
    from vtquant.config import ConfigError
    from vtquant.eval.linear_probe import probe_recipes, run_fashion_mnist_probe

    with pytest.raises(ConfigError, match="unknown \\['gptq'\\]"):
        run_fashion_mnist_probe(data_dir=str(tmp_path), methods=["insertquant", "gptq"])  # before any data or model
    recipes = probe_recipes("asset:clip-vit-b16-openai", "timm", None, ["fp", "rotate", "rotate"], 8, 6)
    assert [(r.display_method, r.activations.bits) for r in recipes] == [("rotate", 6)]
    assert recipes[0].sinks.detect == "auto" and recipes[0].calibration.num_samples == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_linear_probe_several_methods_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path of the lead's H200 run: calibration, rotation and fake quantization on cuda, fp32, TF32 off."""
    result, calls = _probe_methods_run(tmp_path, monkeypatch, "cuda")
    assert result["device"] == "cuda" and result["tf32"] is False and calls["fp"] == 4
    assert not torch.backends.cuda.matmul.allow_tf32
    assert len(result["rows"]) == 10 and all(0 <= r["value"] <= 100 for r in result["rows"])
