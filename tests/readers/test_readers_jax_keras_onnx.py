"""Keras, Flax, orbax and ONNX readers against checkpoints their own frameworks wrote.

Each checkpoint is written once per module (framework imports are slow)
and copied into ``tmp_path`` for every test, since the conformance suite
corrupts files. Expected arrays come from the framework objects, put in
``(out, in, *kernel)`` order by hand.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import numpy as np
import pytest

from gramlin_analyze.errors import CheckpointFormatError, MissingDependencyError
from gramlin_analyze.io.registry import get_reader
from gramlin_analyze.testing import ReaderConformance, Written


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


requires_keras = pytest.mark.skipif(not _has("keras", "h5py"), reason="needs keras and h5py")
requires_flax = pytest.mark.skipif(not _has("flax", "jax"), reason="needs flax and jax")
requires_orbax = pytest.mark.skipif(
    not _has("flax", "jax", "orbax.checkpoint"), reason="needs flax, jax and orbax-checkpoint"
)
requires_onnx = pytest.mark.skipif(not _has("onnx"), reason="needs onnx")


def _copy(src, dst):
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


# --------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras_saved(tmp_path_factory):
    import keras

    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="fc"),
        ]
    )
    rng = np.random.default_rng(11)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()])
    path = tmp_path_factory.mktemp("keras") / "model.weights.h5"
    model.save_weights(path)
    conv_k, conv_b, fc_k, fc_b = model.get_weights()
    expected = {
        "conv2d.weight": np.transpose(conv_k, (3, 2, 0, 1)),
        "conv2d.bias": conv_b,
        "dense.weight": fc_k.T,
        "dense.bias": fc_b,
    }
    return path, expected


@requires_keras
class TestKerasConformance(ReaderConformance):
    reader_name = "keras"

    @pytest.fixture
    def written(self, keras_saved, tmp_path):
        src, expected = keras_saved
        path = _copy(src, tmp_path / src.name)
        return Written(path=path, expected=expected, main_file=path)


@pytest.fixture(scope="module")
def keras_nested(tmp_path_factory):
    """A functional model with a nested Sequential, attention, an embedding, a
    transposed conv and a built optimizer (whose variables are not weights)."""
    import keras

    tokens = keras.Input((5,), dtype="int32")
    image = keras.Input((4, 4, 2))
    h = keras.layers.Embedding(11, 8, name="tok")(tokens)
    h = keras.layers.MultiHeadAttention(2, 3, name="attn")(h, h)
    inner = keras.Sequential(
        [keras.layers.Dense(6, name="a"), keras.layers.Dense(2, name="b")], name="inner"
    )
    h = inner(h)
    up = keras.layers.Conv2DTranspose(5, 3, name="up")(image)
    model = keras.Model([tokens, image], [h, up])
    rng = np.random.default_rng(12)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    path = tmp_path_factory.mktemp("keras_nested") / "nested.weights.h5"
    model.save_weights(path)
    w = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    expected = {
        "embedding.weight": w["tok/embeddings"],
        "sequential.dense.weight": w["inner/a/kernel"].T,
        "sequential.dense.bias": w["inner/a/bias"],
        "sequential.dense_1.weight": w["inner/b/kernel"].T,
        "conv2d_transpose.weight": np.transpose(w["up/kernel"], (2, 3, 0, 1)),
        "conv2d_transpose.bias": w["up/bias"],
        "multi_head_attention.query_dense.weight": w["attn/query/kernel"].reshape(8, 6).T,
        "multi_head_attention.query_dense.bias": w["attn/query/bias"].reshape(6),
        "multi_head_attention.output_dense.weight": w["attn/attention_output/kernel"]
        .reshape(6, 8)
        .T,
        "multi_head_attention.output_dense.bias": w["attn/attention_output/bias"],
    }
    return path, expected


@requires_keras
def test_keras_nested_models_attention_and_optimizer(keras_nested):
    path, expected = keras_nested
    reader = get_reader("keras")
    infos = reader.list_tensors(path)
    assert not [n for n in infos if n.startswith("optimizer")]
    assert infos["multi_head_attention.query_dense.weight"].source_layout == "in_out"
    with reader.open(path) as handle:
        for name, arr in expected.items():
            assert infos[name].shape == arr.shape, name
            np.testing.assert_array_equal(handle.read_tensor(name), arr)


@requires_keras
def test_keras_bfloat16_is_read_as_float32(tmp_path):
    import keras
    import ml_dtypes

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16")])
    rng = np.random.default_rng(13)
    kernel = rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16)
    model.set_weights([kernel, rng.standard_normal(2).astype(ml_dtypes.bfloat16)])
    model.save_weights(tmp_path / "bf.weights.h5")
    reader = get_reader("keras")
    assert reader.list_tensors(tmp_path / "bf.weights.h5")["dense.weight"].dtype == "bfloat16"
    got = reader.read_tensor(tmp_path / "bf.weights.h5", "dense.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, kernel.astype(np.float32).T)


@requires_keras
def test_keras_legacy_h5_is_rejected_with_a_hint(tmp_path):
    import h5py

    path = tmp_path / "old.weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        f.create_group("dense").create_dataset("dense/kernel:0", data=np.ones((2, 2)))
    with pytest.raises(CheckpointFormatError, match="legacy Keras 2"):
        get_reader("keras").list_tensors(path)


# ---------------------------------------------------------------- Flax/orbax


@pytest.fixture(scope="module")
def flax_params():
    """Random parameters of a tiny flax.linen model and the expected tensors."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, image, tokens):
            h = nn.Conv(3, (3, 3), name="conv")(image)
            h = nn.Dense(4, name="fc")(h.reshape(h.shape[0], -1))
            e = nn.Embed(300, 6, name="emb")(tokens)
            return h, nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, name="attn")(e)

    variables = Net().init(
        jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 2)), jnp.zeros((1, 3), "int32")
    )
    rng = np.random.default_rng(21)
    params = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32), variables
    )
    p = params["params"]
    expected = {
        "conv.weight": np.transpose(p["conv"]["kernel"], (3, 2, 0, 1)),
        "conv.bias": p["conv"]["bias"],
        "fc.weight": p["fc"]["kernel"].T,
        "fc.bias": p["fc"]["bias"],
        "emb.weight": p["emb"]["embedding"],
        "attn.query.weight": p["attn"]["query"]["kernel"].reshape(6, 4).T,
        "attn.query.bias": p["attn"]["query"]["bias"].reshape(4),
        "attn.out.weight": p["attn"]["out"]["kernel"].reshape(4, 6).T,
        "attn.out.bias": p["attn"]["out"]["bias"],
    }
    return params, expected


@pytest.fixture(scope="module")
def flax_saved(flax_params, tmp_path_factory):
    from flax.serialization import to_bytes

    params, expected = flax_params
    path = tmp_path_factory.mktemp("flax") / "params.msgpack"
    path.write_bytes(to_bytes(params))
    return path, expected


@requires_flax
class TestFlaxConformance(ReaderConformance):
    reader_name = "flax"

    @pytest.fixture
    def written(self, flax_saved, tmp_path):
        src, expected = flax_saved
        path = _copy(src, tmp_path / src.name)
        return Written(path=path, expected=expected, main_file=path)


def _largest_data_file(item_dir):
    # orbax inlines small arrays in the b-tree (d/); the 300x6 embedding is big
    # enough to get a data file of its own, the largest file of the checkpoint.
    return max(
        (f for f in item_dir.rglob("*") if f.parent.name == "d"), key=lambda f: f.stat().st_size
    )


@pytest.fixture(scope="module")
def orbax_saved(flax_params, tmp_path_factory):
    import orbax.checkpoint as ocp

    params, expected = flax_params
    root = tmp_path_factory.mktemp("orbax")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(root / "12", params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return root / "12", expected


@requires_orbax
class TestOrbaxConformance(ReaderConformance):
    reader_name = "orbax"

    @pytest.fixture
    def written(self, orbax_saved, tmp_path):
        src, expected = orbax_saved
        path = _copy(src, tmp_path / src.name)
        return Written(path=path, expected=expected, main_file=_largest_data_file(path), step=12)


@pytest.fixture(scope="module")
def orbax_managed(flax_params, tmp_path_factory):
    import orbax.checkpoint as ocp

    params, expected = flax_params
    root = tmp_path_factory.mktemp("orbax_manager")
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(root, options=options) as manager:
        manager.save(30, args=ocp.args.StandardSave(params), metrics={"loss": 0.25})
        manager.wait_until_finished()
    return root / "30", expected


@requires_orbax
class TestOrbaxManagerConformance(ReaderConformance):
    reader_name = "orbax"

    @pytest.fixture
    def written(self, orbax_managed, tmp_path):
        src, expected = orbax_managed
        path = _copy(src, tmp_path / src.name)
        main = _largest_data_file(path / "default")
        return Written(path=path, expected=expected, main_file=main, step=30)

    def test_item_directory_and_metrics(self, reader, written):
        item = written.path / "default"
        assert reader.guess_can_read(item)
        assert reader.read_metadata(item).step == 30
        assert reader.read_metadata(written.path).extra["metrics"] == {"loss": 0.25}
        np.testing.assert_array_equal(
            reader.read_tensor(item, "fc.weight"), written.expected["fc.weight"]
        )

    def test_manager_root_is_not_a_checkpoint(self, reader, written):
        assert not reader.guess_can_read(written.path.parent)


# ---------------------------------------------------------------------- ONNX


def _onnx_model(rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    arrays = {
        "block/fc1.weight": rng.standard_normal((4, 5)).astype(np.float32),  # Gemm transB=1
        "block/fc1.bias": rng.standard_normal(4).astype(np.float32),
        "fc2.weight": rng.standard_normal((4, 3)).astype(np.float32),  # MatMul B (in, out)
        "fc3.weight": rng.standard_normal((3, 2)).astype(np.float32),  # Gemm transB=0
        "conv.weight": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(2).astype(np.float32),
        "up.weight": rng.standard_normal((2, 4, 3, 3)).astype(np.float32),  # ConvTranspose
    }
    nodes = [
        helper.make_node("Gemm", ["x", "block/fc1.weight", "block/fc1.bias"], ["h1"], transB=1),
        helper.make_node("MatMul", ["h1", "fc2.weight"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc3.weight"], ["y"], transB=0),
        helper.make_node("Conv", ["img", "conv.weight", "conv.bias"], ["c"]),
        helper.make_node("ConvTranspose", ["c", "up.weight"], ["u"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    expected = {
        "block.fc1.weight": arrays["block/fc1.weight"],
        "block.fc1.bias": arrays["block/fc1.bias"],
        "fc2.weight": arrays["fc2.weight"].T,
        "fc3.weight": arrays["fc3.weight"].T,
        "conv.weight": arrays["conv.weight"],
        "conv.bias": arrays["conv.bias"],
        "up.weight": np.transpose(arrays["up.weight"], (1, 0, 2, 3)),
    }
    return model, expected


@pytest.fixture(scope="module")
def onnx_saved(tmp_path_factory):
    import onnx

    model, expected = _onnx_model(np.random.default_rng(31))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, path)
    return path, expected


@requires_onnx
class TestOnnxConformance(ReaderConformance):
    reader_name = "onnx"

    @pytest.fixture
    def written(self, onnx_saved, tmp_path):
        src, expected = onnx_saved
        path = _copy(src, tmp_path / src.name)
        return Written(path=path, expected=expected, main_file=path)


@requires_onnx
def test_onnx_external_data(tmp_path):
    import onnx

    model, expected = _onnx_model(np.random.default_rng(32))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    reader = get_reader("onnx")
    assert reader.files(path) == [path, tmp_path / "ext.bin"]
    assert reader.list_tensors(path)["fc2.weight"].shape == expected["fc2.weight"].shape
    for name, arr in expected.items():
        np.testing.assert_array_equal(reader.read_tensor(path, name), arr)
    (tmp_path / "ext.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="ext.onnx"):
        reader.read_tensor(path, "fc2.weight")


# -------------------------------------------------------- missing frameworks


@pytest.mark.parametrize(
    ("reader_name", "module", "extra", "suffix"),
    [
        ("keras", "h5py", "keras", "x.weights.h5"),
        ("flax", "flax.serialization", "jax", "x.msgpack"),
        ("orbax", "orbax.checkpoint", "jax", "7"),
        ("onnx", "onnx", "onnx", "x.onnx"),
    ],
)
def test_missing_framework_names_the_extra(
    reader_name, module, extra, suffix, tmp_path, monkeypatch
):
    target = tmp_path / suffix
    if reader_name == "orbax":
        target.mkdir()
        (target / "_METADATA").write_text("{}")
    else:
        target.write_bytes(b"not empty")
    reader = get_reader(reader_name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=rf"gramlin-analyze\[{extra}\]"):
        reader.list_tensors(target)
