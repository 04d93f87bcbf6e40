"""Keras ImageNet Xception ``.h5`` -> timm ``legacy_xception``: the features must be Keras' features.

The reference is real Keras (``keras`` 3 on its torch backend, no TensorFlow needed): a Keras
Xception with random weights and BatchNorm statistics calibrated on real images is saved in each
supported layout, converted, and compared on real images (scikit-learn's sample photos) at
299x299 and 224x224, in torch and through ONNX Runtime.  Tests that need Keras skip without it;
the rest (TF-'same' pooling, the model patch, layout parsing, error messages) always run.
"""

from __future__ import annotations

import io
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # must precede the first ``import keras``

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import nn

from skill_edge.export.backbone import GlobalPool, build_backbone, stages_of
from skill_edge.export.keras_xception import (
    KERAS_BN_EPSILON,
    TFSameMaxPool3x3s2,
    keras_h5_to_state_dict,
    make_keras_compatible,
    xception_layer_plan,
)
from skill_edge.export.weights import WeightsError

# Keras' torch backend calls numpy's __array__ without `copy`; harmless, and thousands of lines of noise.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")

BN_KERAS_TO_TIMM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
TOLERANCE = 1e-4  # absolute, on pooled features whose largest entries are of order 1 (asserted below)


# --------------------------------------------------------------------------- helpers
def _tf_same_max_pool_reference(x: np.ndarray, k: int = 3, s: int = 2) -> np.ndarray:
    """TensorFlow's SAME max-pool written out from its definition (NCHW, loops; small inputs only)."""
    n, c, h, w = x.shape
    out_h, out_w = -(-h // s), -(-w // s)
    pad_h = max((out_h - 1) * s + k - h, 0)
    pad_w = max((out_w - 1) * s + k - w, 0)
    padded = np.full((n, c, h + pad_h, w + pad_w), -np.inf, dtype=x.dtype)
    padded[:, :, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w] = x
    out = np.empty((n, c, out_h, out_w), dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = padded[:, :, i * s : i * s + k, j * s : j * s + k].max(axis=(2, 3))
    return out


def _photos(size: int) -> np.ndarray:
    """scikit-learn's two sample photos resized to ``size`` x ``size``, NHWC in Keras' [-1, 1] range."""
    images = [Image.fromarray(im).resize((size, size), Image.BICUBIC) for im in load_sample_images().images]
    return np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _features(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(_nchw(x)).numpy()


def _write_keras2_weights(path, layers: dict[str, dict[str, np.ndarray]], chunk_layer_names: bool = False) -> None:
    """Write ``layers`` the way Keras 2 ``save_weights('x.h5')`` does (the layout Keras ships ImageNet weights in)."""
    with h5py.File(path, "w") as f:
        names = [n.encode() for n in layers]
        if chunk_layer_names:  # Keras 2 splits attributes over 64 KB into name0, name1, ...
            f.attrs["layer_names0"], f.attrs["layer_names1"] = names[:50], names[50:]
        else:
            f.attrs["layer_names"] = names
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.15.0"
        for layer, weights in layers.items():
            group = f.create_group(layer)
            weight_names = [f"{layer}/{w}:0" for w in weights]
            for name, value in zip(weight_names, weights.values()):
                group.create_dataset(name, data=value)
            group.attrs["weight_names"] = [n.encode() for n in weight_names]


# --------------------------------------------------------------------------- no Keras needed
@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (4, 4), (5, 8), (9, 10), (74, 74), (147, 147), (19, 19), (28, 14)])
def test_tf_same_pool_equals_tensorflow_definition(h: int, w: int) -> None:
    x = np.random.default_rng(h * 100 + w).normal(size=(2, 3, h, w)).astype(np.float32)
    expected = _tf_same_max_pool_reference(x)
    got = TFSameMaxPool3x3s2()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)
    torch_pool = nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x)).numpy()
    if h % 2 == 0 and h > 2:  # this is the difference the module exists for (at h=2 one window sees all)
        assert not np.array_equal(torch_pool, expected)


def test_tf_same_pool_exports_to_a_static_onnx_graph_correct_for_any_size() -> None:
    buf = io.BytesIO()
    torch.onnx.export(
        TFSameMaxPool3x3s2(),
        (torch.randn(1, 4, 74, 75),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Pad" not in ops and "Shape" not in ops  # no shape arithmetic for runtimes to choke on
    for h, w in [(74, 75), (9, 8), (147, 147), (2, 2)]:
        x = np.random.default_rng(h).normal(size=(3, 4, h, w)).astype(np.float32)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], _tf_same_max_pool_reference(x))


def test_make_keras_compatible_patches_every_bn_and_pool_and_is_idempotent() -> None:
    model = timm.create_model("legacy_xception")
    pools_before = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert pools_before == 4
    for _ in range(2):
        assert make_keras_compatible(model) is model
        assert all(m.eps == KERAS_BN_EPSILON for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 0
        assert sum(isinstance(m, TFSameMaxPool3x3s2) for m in model.modules()) == 4
    with pytest.raises(TypeError, match="legacy_xception"):
        make_keras_compatible(timm.create_model("resnet18"))


def _random_keras2_layers(include_top: bool) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, torch.Tensor]]:
    """Random Keras-layout weights for every Xception layer, and the timm tensors they must become.

    This checks file parsing and key placement (names, ``:0`` suffixes, residual layers
    recognised by width whatever their session-dependent names, ``conv2d_5``..., in any order);
    that the numbers then compute what Keras computes is checked against Keras itself below.
    """
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in timm.create_model("legacy_xception").state_dict().items()}
    timm_sd = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items() if "num_batches" not in k}
    layers: dict[str, dict[str, np.ndarray]] = {}
    residual_ids = {128: 7, 256: 5, 728: 8, 1024: 6}
    for layer in xception_layer_plan(include_top):
        p = layer.timm_prefix
        if layer.kind == "conv":
            weights = {"kernel": timm_sd[f"{p}.weight"].numpy().transpose(2, 3, 1, 0)}
        elif layer.kind == "sepconv":
            weights = {
                "depthwise_kernel": timm_sd[f"{p}.conv1.weight"].numpy().transpose(2, 3, 0, 1),
                "pointwise_kernel": timm_sd[f"{p}.pointwise.weight"].numpy().transpose(2, 3, 1, 0),
            }
        elif layer.kind == "bn":
            weights = {k: timm_sd[f"{p}.{t}"].numpy() for k, t in BN_KERAS_TO_TIMM.items()}
        else:
            weights = {"kernel": timm_sd["fc.weight"].numpy().T, "bias": timm_sd["fc.bias"].numpy()}
        name = layer.keras_name
        if name is None:
            kind = "conv2d" if layer.kind == "conv" else "batch_normalization"
            name = f"{kind}_{residual_ids[layer.residual_width]}"
        layers[name] = weights
    keys = list(layers)
    rng.shuffle(keys)
    return {k: layers[k] for k in keys}, timm_sd


@pytest.mark.parametrize("include_top", [False, True])
def test_keras2_layout_maps_every_tensor_to_its_timm_place(tmp_path, include_top: bool) -> None:
    layers, timm_sd = _random_keras2_layers(include_top)
    path = tmp_path / "xception.h5"
    _write_keras2_weights(path, layers, chunk_layer_names=include_top)
    sd = keras_h5_to_state_dict(path)
    assert set(sd) == set(timm_sd)
    for key, value in sd.items():
        if key.startswith("fc.") and not include_top:
            assert not value.any(), "include_top=False must give an all-zero classifier"
            assert value.shape == timm_sd[key].shape
        else:
            torch.testing.assert_close(value, timm_sd[key], rtol=0, atol=0, msg=key)


def test_not_an_xception_names_the_missing_layer(tmp_path) -> None:
    layers, _ = _random_keras2_layers(include_top=False)
    del layers["block7_sepconv2_bn"]
    path = tmp_path / "broken.h5"
    _write_keras2_weights(path, layers)
    with pytest.raises(WeightsError, match=r"broken\.h5 is not a Keras ImageNet Xception: layer 'block7_sepconv2_bn'"):
        keras_h5_to_state_dict(path)

    layers, _ = _random_keras2_layers(include_top=False)
    layers["conv2d_9"] = dict(layers["conv2d_7"])  # a second 128-wide residual conv
    _write_keras2_weights(path, layers)
    with pytest.raises(WeightsError, match=r"residual 1x1 conv with 128 output channels is ambiguous"):
        keras_h5_to_state_dict(path)

    other = tmp_path / "resnet.weights.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 64), np.float32))
    with pytest.raises(WeightsError, match=r"Keras 3 \.weights\.h5 file but has no Xception"):
        keras_h5_to_state_dict(other)

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5")
    with pytest.raises(WeightsError, match="not a readable HDF5 file"):
        keras_h5_to_state_dict(junk)
    with pytest.raises(WeightsError, match="does not exist"):
        keras_h5_to_state_dict(tmp_path / "missing.h5")
    with pytest.raises(WeightsError, match="not a Keras ImageNet Xception"):  # and through the factory too
        build_backbone("xception", weights=path)


# --------------------------------------------------------------------------- against real Keras
@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> dict:
    """A Keras Xception with random weights and calibrated BN statistics, saved in every layout.

    BN moving statistics are set to the batch statistics of real images (one training-mode pass
    with momentum 0), and gamma/beta are random, so activations stay of order 1 and the pooled
    features depend on the input, as with trained weights.
    """
    keras = pytest.importorskip("keras", reason="the Keras reference needs `pip install keras` (torch backend)")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("keras_xception")

    notop = keras.applications.Xception(weights=None, include_top=False, pooling="avg")
    bns = [layer for layer in notop.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        n = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), np.zeros(n), np.ones(n)])
        bn.momentum = 0.0
    notop(np.concatenate([_photos(96), rng.uniform(-1, 1, (2, 96, 96, 3))]).astype(np.float32), training=True)
    for bn in bns:
        bn.momentum = 0.99

    files = {"keras3_legacy_h5": out / "notop.h5", "keras3_weights_h5": out / "notop.weights.h5"}
    notop.save(files["keras3_legacy_h5"])
    notop.save_weights(files["keras3_weights_h5"])

    # Keras 2 layout (what Keras ships ImageNet weights in), written from the Keras 3 file.
    with h5py.File(files["keras3_legacy_h5"], "r") as f:
        root = f["model_weights"]
        renamed = {"conv2d": "conv2d_4", "batch_normalization": "batch_normalization_4"}  # session-dependent names
        layers = {}
        for name in map(_text, root.attrs["layer_names"]):
            weight_names = root[name].attrs.get("weight_names", [])
            if len(weight_names):
                layers[renamed.get(name, name)] = {_text(w).rsplit("/", 1)[-1]: root[name][w][()] for w in weight_names}
    files["keras2_h5"] = out / "notop_keras2.h5"
    _write_keras2_weights(files["keras2_h5"], layers)

    # The same Xception nested in a bigger model, as in a fine-tuned `.keras` archive's model.weights.h5.
    inputs = keras.Input((None, None, 3))
    wrapper = keras.Model(inputs, keras.layers.Dense(3, name="task_head")(notop(inputs)))
    files["keras3_nested_weights_h5"] = out / "wrapped.weights.h5"
    wrapper.save_weights(files["keras3_nested_weights_h5"])

    top = keras.applications.Xception(weights=None, include_top=True)
    for src, dst in zip([l for l in notop.layers if l.weights], [l for l in top.layers if l.weights]):
        dst.set_weights(src.get_weights())
    top.get_layer("predictions").set_weights([rng.normal(0, 0.3, (2048, 1000)), rng.normal(0, 1, 1000)])
    files["keras3_top_h5"], files["keras3_top_weights_h5"] = out / "top.h5", out / "top.weights.h5"
    top.save(files["keras3_top_h5"])
    top.save_weights(files["keras3_top_weights_h5"])

    x299, x224 = _photos(299), _photos(224)[:1]
    ref299 = keras.ops.convert_to_numpy(notop(x299, training=False))
    return {
        "files": files,
        "x299": x299,
        "x224": x224,
        "ref299": ref299,
        "ref224": keras.ops.convert_to_numpy(notop(x224, training=False)),
        # Keras' own classifier layer (Dense + softmax) on Keras' pooled features
        "probs299": keras.ops.convert_to_numpy(top.get_layer("predictions")(ref299)),
    }


def _assert_keras_features(got: np.ndarray, ref: np.ndarray) -> None:
    assert 0.1 < np.abs(ref).max() < 10, "features must be of order 1 for an absolute tolerance to mean anything"
    assert ref.std(axis=0).mean() > 1e-2, "features must depend on the image"
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOLERANCE)


def test_converted_features_match_keras(keras_files: dict) -> None:
    """The whole factory path (build_backbone -> weights.py -> this module) against Keras' outputs.

    One layout is enough here: the next test shows every layout gives bit-identical tensors.
    """
    backbone = build_backbone("xception", weights=keras_files["files"]["keras3_legacy_h5"])
    assert backbone.weights_source.startswith("keras_h5:")
    features = backbone.features()
    _assert_keras_features(_features(features, keras_files["x299"]), keras_files["ref299"])
    # 224 makes Keras' block4 and block13 pools see even sizes (at 299 it is block3)
    np.testing.assert_allclose(_features(features, keras_files["x224"]), keras_files["ref224"], rtol=0, atol=TOLERANCE)


def test_every_layout_gives_the_same_state_dict(keras_files: dict) -> None:
    files = keras_files["files"]
    reference = keras_h5_to_state_dict(files["keras3_legacy_h5"])
    top = keras_h5_to_state_dict(files["keras3_top_h5"])
    layouts = ("keras3_weights_h5", "keras2_h5", "keras3_nested_weights_h5", "keras3_top_h5", "keras3_top_weights_h5")
    for layout in layouts:
        sd = keras_h5_to_state_dict(files[layout])
        assert set(sd) == set(reference), layout
        for key in reference:
            if "top" in layout and key.startswith("fc."):  # checked in test_include_top_maps_the_imagenet_classifier
                torch.testing.assert_close(sd[key], top[key], rtol=0, atol=0, msg=f"{layout}: {key}")
                continue
            torch.testing.assert_close(sd[key], reference[key], rtol=0, atol=0, msg=f"{layout}: {key}")


def test_plain_timm_without_the_keras_fixes_does_not_match(keras_files: dict) -> None:
    """Guards the test itself: the same tensors in an unpatched timm model are measurably off."""
    model = timm.create_model("legacy_xception").eval()
    model.load_state_dict(keras_h5_to_state_dict(keras_files["files"]["keras3_legacy_h5"]))
    plain = nn.Sequential(*stages_of(model, "legacy_xception"), GlobalPool()).eval()
    err = np.abs(_features(plain, keras_files["x224"]) - keras_files["ref224"]).max()
    assert err > 100 * TOLERANCE


def test_onnx_export_matches_keras(keras_files: dict) -> None:
    features = build_backbone("xception", weights=keras_files["files"]["keras3_legacy_h5"]).features()
    buf = io.BytesIO()
    torch.onnx.export(
        features,
        (torch.zeros(1, 3, 299, 299),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "n"}, "features": {0: "n"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": _nchw(keras_files["x299"]).numpy()})[0]
    _assert_keras_features(got, keras_files["ref299"])


def test_include_top_maps_the_imagenet_classifier(keras_files: dict) -> None:
    """timm's fc on Keras' features gives Keras' class probabilities (the backbone part is the same as no-top)."""
    model = timm.create_model("legacy_xception")
    model.load_state_dict(keras_h5_to_state_dict(keras_files["files"]["keras3_top_h5"]))
    with torch.no_grad():
        logits = model.forward_head(torch.from_numpy(keras_files["ref299"])[:, :, None, None])
    log_probs = torch.log_softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(log_probs, np.log(keras_files["probs299"]), rtol=0, atol=1e-4)
    assert keras_files["probs299"].max() > 0.01, "random classifier must not be flat for this check to bite"
    notop = keras_h5_to_state_dict(keras_files["files"]["keras3_legacy_h5"])
    assert not notop["fc.weight"].any() and notop["fc.weight"].shape == (1000, 2048)
