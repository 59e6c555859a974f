"""load_official_weights: strict, all-or-nothing, clear errors."""

import struct
import zipfile

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim import WeightLoadingError
from tests.conftest import (
    fixture_path,
    needs_torch_backend,
    released_state_dict,
    make_tiny_backbone,
    make_tiny_classifier,
    to_numpy,
)


def released_state(*names):
    state = released_state_dict(*names)
    state.pop("head.bn.num_batches_tracked", None)
    return state


def snapshot(model):
    return [to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    for old, new in zip(before, snapshot(model)):
        np.testing.assert_array_equal(old, new)


def test_layouts_are_converted():
    state = released_state("backbone.pth")
    backbone = make_tiny_backbone()
    keras_aim.load_official_weights(backbone, backbone_file=state)
    np.testing.assert_array_equal(
        to_numpy(backbone.patch_embedding.proj.kernel),
        state["preprocessor.patchifier.proj.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        to_numpy(backbone.blocks[2].attn.qkv.kernel),
        state["trunk.blocks.2.attn.qkv.weight"].T,
    )
    np.testing.assert_array_equal(
        to_numpy(backbone.post_trunk_norm.gamma),
        state["trunk.post_trunk_norm.weight"],
    )


def test_every_problem_listed_in_one_error_and_nothing_loaded():
    state = released_state("backbone.pth", "head.pth")
    del state["trunk.blocks.3.mlp.fc2.weight"]
    del state["head.cls_token"]
    state["trunk.blocks.9.attn.qkv.weight"] = np.zeros((3, 3), "float32")
    state["head.linear.weight"] = np.zeros((1000, 64), "float32")
    state["trunk.blocks.0.attn.proj.weight"] = np.zeros((64, 32), "float32")
    classifier = make_tiny_classifier()
    before = snapshot(classifier)
    with pytest.raises(WeightLoadingError) as info:
        keras_aim.load_official_weights(classifier, backbone_file=state)
    message = str(info.value)
    assert "nothing was loaded" in message
    assert "2 missing keys" in message
    assert "trunk.blocks.3.mlp.fc2.weight  expected shape (64, 256)" in message
    assert "head.cls_token  expected shape (1, 1, 64)" in message
    assert "1 unexpected keys" in message
    assert "trunk.blocks.9.attn.qkv.weight  shape (3, 3)" in message
    assert "2 shape mismatches" in message
    assert "head.linear.weight  expected shape (10, 64), found (1000, 64)" in message
    assert (
        "trunk.blocks.0.attn.proj.weight  expected shape (64, 64), found (64, 32)"
        in message
    )
    assert_unchanged(classifier, before)


def test_head_keys_into_a_backbone_are_unexpected():
    backbone = make_tiny_backbone()
    before = snapshot(backbone)
    with pytest.raises(WeightLoadingError, match="head keys need an AIMImageClassifier"):
        keras_aim.load_official_weights(
            backbone, backbone_file=fixture_path("model.safetensors")
        )
    assert_unchanged(backbone, before)


def test_head_file_for_a_backbone_is_refused():
    with pytest.raises(ValueError, match="Load it into an AIMImageClassifier"):
        keras_aim.load_official_weights(
            make_tiny_backbone(), head_file=fixture_path("head.pth")
        )


def test_no_files_is_refused():
    with pytest.raises(ValueError, match="backbone_file and/or head_file"):
        keras_aim.load_official_weights(make_tiny_backbone())


def test_wrong_model_type_is_refused():
    with pytest.raises(TypeError, match="AIMBackbone or AIMImageClassifier"):
        keras_aim.load_official_weights(object(), backbone_file={})


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        keras_aim.load_official_weights(make_tiny_backbone(), backbone_file=path)


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(open(fixture_path("backbone.pth"), "rb").read()[:1000])
    with pytest.raises(WeightLoadingError, match="truncated"):
        keras_aim.load_official_weights(make_tiny_backbone(), backbone_file=str(path))


def test_backbone_only_file_leaves_probe_untouched():
    classifier = make_tiny_classifier()
    probe_before = [to_numpy(w).copy() for w in classifier.probe.weights]
    keras_aim.load_official_weights(
        classifier, backbone_file=fixture_path("backbone.pth")
    )
    for old, new in zip(probe_before, classifier.probe.weights):
        np.testing.assert_array_equal(old, to_numpy(new))


def test_head_only_file_fills_probe_and_bn_statistics():
    state = released_state("head.pth")
    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(classifier, head_file=fixture_path("head.pth"))
    np.testing.assert_array_equal(
        to_numpy(classifier.probe.bn.moving_variance), state["head.bn.running_var"]
    )
    np.testing.assert_array_equal(
        to_numpy(classifier.probe.cls_token), state["head.cls_token"]
    )


@needs_torch_backend
def test_bfloat16_released_tensors_are_accepted():
    import torch

    state = torch.load(fixture_path("backbone.pth"), weights_only=True)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    backbone = make_tiny_backbone()
    keras_aim.load_official_weights(backbone, backbone_file=state)
    np.testing.assert_allclose(
        to_numpy(backbone.blocks[0].mlp.fc1.kernel),
        state["trunk.blocks.0.mlp.fc1.weight"].float().numpy().T,
    )


@needs_torch_backend
def test_torch_zip_reader_matches_torch_load(tmp_path):
    """Our torch-free reader vs torch.load, including views with offsets and
    strides into shared storages, bfloat16 and integer tensors."""
    import torch

    from keras_aim.loading.state_dict import TorchZipReader

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "plain": torch.randn(3, 4),
        "transposed": base.t(),  # strided view
        "row_slice": base[2:5],  # storage offset
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "int": torch.tensor([1, 2, 3], dtype=torch.int64),
        "scalar": torch.tensor(7),
    }
    path = tmp_path / "state.pth"
    torch.save(state, path)
    reader = TorchZipReader(str(path))
    assert reader.keys() == list(state)
    for key, tensor in state.items():
        got = reader.array(key)
        assert reader.shape(key) == tuple(tensor.shape)
        np.testing.assert_array_equal(
            np.asarray(got, dtype="float64"), tensor.double().numpy(), err_msg=key
        )
    reader.close()


@pytest.mark.skipif(
    keras.config.backend() == "torch", reason="the torch backend needs torch"
)
def test_released_files_read_without_torch(monkeypatch, reference):
    """Loading .pth files does not need torch (it is an optional extra)."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> error
    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(
        classifier,
        backbone_file=fixture_path("backbone.pth"),
        head_file=fixture_path("head.pth"),
    )
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    import pickle
    import zipfile

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": print}))
    with pytest.raises(WeightLoadingError, match="builtins.print is not allowed"):
        keras_aim.load_official_weights(make_tiny_backbone(), backbone_file=str(path))


# --- Damaged and hostile files: refused before any variable changes --------


def _pickled_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _pickled_ints(values):
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def write_pth(path, tensors, storages):
    """A `torch.save`-style zip written by hand, so that its declared shapes,
    strides and offsets can lie: `tensors` maps key -> (storage key, storage
    class, offset, shape, stride); `storages` maps storage key -> bytes."""
    pickled = b"\x80\x02}("
    for key, (storage, kind, offset, shape, stride) in tensors.items():
        pickled += _pickled_str(key) + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        pickled += _pickled_str("storage") + b"ctorch\n" + kind.encode() + b"\n"
        pickled += _pickled_str(storage) + _pickled_str("cpu") + b"J\0\0\0\0tQ"
        pickled += b"J" + struct.pack("<i", offset) + _pickled_ints(shape)
        pickled += _pickled_ints(stride) + b"\x89NtR"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled + b"u.")
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)


def test_hand_written_checkpoint_reads_like_torch(tmp_path):
    from keras_aim.loading.state_dict import TorchZipReader

    path = tmp_path / "views.pth"
    write_pth(path, {"t": ("0", "FloatStorage", 1, (2, 3), (1, 2))},
              {"0": np.arange(8, dtype="float32").tobytes()})
    reader = TorchZipReader(str(path))
    np.testing.assert_array_equal(reader.array("t"), [[1, 3, 5], [2, 4, 6]])
    reader.close()


@pytest.mark.parametrize(
    "record,storage,problem",
    [
        # 6 floats declared over 4 stored: the data is shorter than the shape.
        (("0", "FloatStorage", 0, (2, 3), (3, 1)), 16, "reaching 24 bytes"),
        (("0", "FloatStorage", 3, (2,), (1,)), 16, "reaching 20 bytes"),  # offset
        (("0", "FloatStorage", 0, (2, 2), (4, 1)), 16, "reaching 24 bytes"),  # strides
        # A huge tensor over 4 bytes (read blindly, this crashed Python).
        (("0", "FloatStorage", 0, (1 << 20, 1 << 20), (1 << 20, 1)), 4, "reaching"),
        (("0", "FloatStorage", -4, (1,), (1,)), 16, "invalid shape"),
        (("0", "FloatStorage", 0, (2,), (-1,)), 16, "invalid shape"),
        (("0", "DoubleStorage", 0, (1,), (1,)), 12, "not a multiple of 8"),
        (("7", "FloatStorage", 0, (1,), (1,)), 16, "not in the file"),
    ],
)
def test_declared_sizes_are_checked_against_the_bytes_present(
    tmp_path, record, storage, problem
):
    path = tmp_path / "lying.pth"
    write_pth(path, {"trunk.post_trunk_norm.weight": record}, {"0": b"\1" * storage})
    backbone = make_tiny_backbone()
    before = snapshot(backbone)
    with pytest.raises(WeightLoadingError) as info:
        keras_aim.load_official_weights(backbone, backbone_file=str(path))
    message = str(info.value)
    assert str(path) in message and "'trunk.post_trunk_norm.weight'" in message
    assert problem in message
    assert_unchanged(backbone, before)


def test_damaged_zip_entry_changes_no_variable(tmp_path):
    """A bad CRC in the last block's data: found before anything is assigned
    (it used to raise zipfile's error after earlier variables were filled)."""
    raw = bytearray(open(fixture_path("backbone.pth"), "rb").read())
    with zipfile.ZipFile(fixture_path("backbone.pth")) as archive:
        key = "trunk.blocks.3.mlp.fc2.weight"
        storage = released_state_storage(archive, key)
        data = archive.read(storage)
    start = raw.find(data)
    raw[start + len(data) // 2] ^= 0xFF
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(raw))
    backbone = make_tiny_backbone()
    before = snapshot(backbone)
    with pytest.raises(WeightLoadingError, match=f"{path}.*damaged.*{key}.*Nothing was loaded"):
        keras_aim.load_official_weights(backbone, backbone_file=str(path))
    assert_unchanged(backbone, before)


def released_state_storage(archive, key):
    """The zip entry holding `key`'s data in a torch checkpoint."""
    from keras_aim.loading.state_dict import TorchZipReader

    reader = TorchZipReader(archive.filename)
    try:
        return reader._storage_name(reader._records[key])
    finally:
        reader.close()


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(open(fixture_path("model.safetensors"), "rb").read()[:20000])
    with pytest.raises(WeightLoadingError, match=f"{path}.*truncated or damaged"):
        keras_aim.load_official_weights(make_tiny_backbone(), backbone_file=str(path))


def test_random_file_named_pth_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(WeightLoadingError) as info:
        keras_aim.load_official_weights(make_tiny_backbone(), backbone_file=str(path))
    assert "not a weights file" in str(info.value)
    assert "weights_only" not in str(info.value)
