"""SavedModel export for TF Serving (keras_aim.export, `keras-aim export`)."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim import cli
from keras_aim.export import saved_model as aim_export
from keras_aim.export.versions import next_version
from tests.conftest import (
    PARITY_ATOL,
    fixture_path,
    make_tiny_backbone,
    make_tiny_classifier,
    to_numpy,
)

BACKEND = keras.config.backend()
# Two input sizes, batch sizes 1 and 3 (resized + cropped to 32x32 inside).
BATCH_SHAPES = [(1, 50, 70, 3), (3, 40, 36, 3)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny classifier and backbone (reference weights), each exported
    once as version 1; on PyTorch through the TensorFlow subprocess."""
    converter = keras_aim.AIMImageConverter(image_size=(32, 32))
    classifier = make_tiny_classifier(
        preprocessor=keras_aim.AIMImageClassifierPreprocessor(converter)
    )
    keras_aim.load_official_weights(
        classifier,
        backbone_file=fixture_path("backbone.pth"),
        head_file=fixture_path("head.pth"),
    )
    backbone = make_tiny_backbone()
    keras_aim.load_official_weights(backbone, backbone_file=fixture_path("backbone.pth"))
    root = tmp_path_factory.mktemp("exports")
    return {
        "converter": converter,
        "classifier": classifier,
        "backbone": backbone,
        "classifier_dir": aim_export.export_saved_model(classifier, root / "classifier"),
        "backbone_dir": aim_export.export_saved_model(backbone, root / "backbone", top_k=3),
    }


def keras_outputs(model, converter, raw, top_k=5):
    """What the exported graph should return: the Keras model's logits or
    tokens, and everything else computed here with NumPy (not with the
    function that was traced into the SavedModel)."""
    outputs = to_numpy(model(converter(raw), training=False)).astype("float32")
    if isinstance(model, keras_aim.AIMBackbone):
        return {"tokens": outputs, "embedding": outputs.mean(axis=1)}
    shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    return {
        "logits": outputs,
        "probabilities": probabilities,
        "top_k_indices": indices.astype("int32"),
        "top_k_scores": np.take_along_axis(probabilities, indices, axis=-1),
    }


def test_saved_model_outputs_match_independent_computations(exports):
    """Every output of every exported signature against NumPy: the mean of
    the Keras tokens, softmax and top-k of the Keras logits (the export's
    own `serving_outputs` is not the reference)."""
    import tensorflow as tf

    raw = np.random.RandomState(5).randint(0, 256, (3, 40, 52, 3)).astype("uint8")
    encoded = tf.constant([tf.io.encode_png(image).numpy() for image in raw])
    for key, names in (("classifier", aim_export.CLASSIFIER_OUTPUTS),
                       ("backbone", aim_export.BACKBONE_OUTPUTS)):
        expected = keras_outputs(exports[key], exports["converter"], raw)
        assert sorted(expected) == sorted(names)
        signatures = tf.saved_model.load(exports[f"{key}_dir"]).signatures
        served = {
            "serving_default": signatures["serving_default"](images=tf.constant(raw)),
            "predict_images": signatures["predict_images"](image_bytes=encoded),
            "predict_preprocessed": signatures["predict_preprocessed"](
                images=tf.constant(to_numpy(exports["converter"](raw)))),
        }
        for signature, outputs in served.items():
            for name in names:
                got = outputs[name].numpy()
                if name == "top_k_indices":
                    np.testing.assert_array_equal(got, expected[name], err_msg=signature)
                else:
                    np.testing.assert_allclose(got, expected[name], atol=PARITY_ATOL,
                                               err_msg=f"{key} {signature} {name}")


def test_layout_is_tf_serving_version_folders(exports):
    for key in ("classifier_dir", "backbone_dir"):
        path = Path(exports[key])
        assert path.name == "1"
        assert (path / "saved_model.pb").is_file()
        assert (path / "variables").is_dir()
        assert sorted(p.name for p in path.parent.iterdir()) == ["1"]  # no leftovers
        # Every weight stored once (float32 here; TensorFlow leaves out the
        # few the graph does not use, e.g. the classifier's unused final norm).
        model = exports[key.replace("_dir", "")]
        weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
        stored = sum(f.stat().st_size for f in (path / "variables").iterdir())
        assert 0.95 * weight_bytes <= stored < 1.05 * weight_bytes


@pytest.mark.slow
def test_saved_model_matches_keras_in_a_process_without_keras(exports, tmp_path):
    rng = np.random.RandomState(0)
    batches = [rng.randint(0, 256, shape).astype("uint8") for shape in BATCH_SHAPES]
    np.savez(tmp_path / "in.npz", **{f"batch{i}": b for i, b in enumerate(batches)})
    script = str(Path(__file__).parent / "serve_without_keras.py")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run(
        [sys.executable, script, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
         exports["classifier_dir"], exports["backbone_dir"]],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = dict(np.load(tmp_path / "out.npz"))
    # No keras/keras_hub/keras_aim/tf_keras module beyond what `import
    # tensorflow` loads by itself.
    assert str(served["imported"]) == ""

    for m, (model, names) in enumerate(
        [(exports["classifier"], aim_export.CLASSIFIER_OUTPUTS),
         (exports["backbone"], aim_export.BACKBONE_OUTPUTS)]
    ):
        for i, raw in enumerate(batches):
            expected = keras_outputs(model, exports["converter"], raw)
            assert sorted(expected) == sorted(names)
            for signature in ("serving_default", "predict_images"):
                for name in names:
                    got = served[f"m{m}/{signature}/{i}/{name}"]
                    assert got.shape == expected[name].shape, (signature, name)
                    if name == "top_k_indices":
                        np.testing.assert_array_equal(got, expected[name])
                    else:
                        np.testing.assert_allclose(
                            got, expected[name], atol=PARITY_ATOL, err_msg=f"{signature} {name}"
                        )
        # A corrupt image fails its own request only.
        assert str(served[f"m{m}/corrupt_error"]) == "InvalidArgumentError"
        assert served[f"m{m}/after_corrupt"].shape[0] == 1
    # The backbone's embedding is the mean of its tokens; classifier top_k=5.
    assert served["m0/serving_default/1/top_k_indices"].shape == (3, 5)
    assert served["m1/serving_default/0/tokens"].shape == (1, 16, 64)


def signature_listing(model_dir) -> str:
    result = subprocess.run(
        # The tool of the TensorFlow installed beside this Python (also when
        # its environment is not activated).
        [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
         "show", "--dir", str(model_dir), "--all"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def signature_block(listing: str, name: str) -> str:
    """The part of `saved_model_cli show --all` about one signature."""
    start = listing.index(f"signature_def['{name}']:")
    end = listing.find("signature_def[", start + 1)
    return listing[start : end if end > 0 else None]


@pytest.mark.slow
def test_saved_model_cli_lists_documented_signatures(exports):
    listing = signature_listing(exports["classifier_dir"])
    blocks = {name: signature_block(listing, name) for name in aim_export.SIGNATURES}
    assert "inputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, -1, -1, 3)" in blocks["serving_default"]
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in blocks["predict_images"]
    assert "inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 32, 32, 3)" in blocks["predict_preprocessed"]
    for block in blocks.values():
        for output in aim_export.CLASSIFIER_OUTPUTS:
            assert f"outputs['{output}'] tensor_info:" in block
    assert "outputs['top_k_indices'] tensor_info:\n        dtype: DT_INT32\n        shape: (-1, 5)" in blocks["serving_default"]


def saved_model_proto(model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(model_dir) / "saved_model.pb").read_bytes())
    return proto


def test_backbone_signatures(exports):
    """The same signature defs saved_model_cli prints, read from the proto
    (one saved_model_cli process per backend pass is enough)."""
    signatures = saved_model_proto(exports["backbone_dir"]).meta_graphs[0].signature_def
    assert set(signatures) >= set(aim_export.SIGNATURES)
    for name, (input_name, dims) in {
        "serving_default": ("images", [-1, -1, -1, 3]),
        "predict_images": ("image_bytes", [-1]),
        "predict_preprocessed": ("images", [-1, 32, 32, 3]),
    }.items():
        (key,) = signatures[name].inputs
        assert key == input_name
        assert [d.size for d in signatures[name].inputs[key].tensor_shape.dim] == dims
        outputs = signatures[name].outputs
        assert sorted(outputs) == sorted(aim_export.BACKBONE_OUTPUTS)
        assert [d.size for d in outputs["tokens"].tensor_shape.dim] == [-1, 16, 64]
        assert [d.size for d in outputs["embedding"].tensor_shape.dim] == [-1, 64]


@pytest.mark.skipif(BACKEND != "jax", reason="jax2tf export only")
def test_jax_export_serves_on_cpu_and_cuda(exports):
    proto = saved_model_proto(exports["classifier_dir"])
    platforms = {
        tuple(node.attr["platforms"].list.s)
        for function in proto.meta_graphs[0].graph_def.library.function
        for node in function.node_def
        if node.op == "XlaCallModule"
    }
    assert platforms == {(b"CPU", b"CUDA")}


def test_tf_keras_wrapper_uses_aim_features(exports):
    import tensorflow as tf
    import tf_keras

    raw = np.random.RandomState(1).randint(0, 256, (2, 40, 48, 3)).astype("uint8")
    inputs = tf_keras.Input(shape=(None, None, 3), dtype="uint8")
    features = aim_export.keras2_layer(exports["backbone_dir"], output="embedding")(inputs)
    head = tf_keras.layers.Dense(4, kernel_initializer="ones", name="head")
    model = tf_keras.Model(inputs, head(features))
    expected = keras_outputs(exports["backbone"], exports["converter"], raw)["embedding"]
    np.testing.assert_allclose(
        model.predict(raw, verbose=0), expected.sum(-1, keepdims=True).repeat(4, -1), atol=1e-3
    )
    assert [w.name for w in model.trainable_weights] == ["head/kernel:0", "head/bias:0"]
    # The whole dict, from encoded images.
    logits = aim_export.keras2_layer(exports["classifier_dir"], signature="predict_images")(
        tf.constant([tf.io.encode_png(raw[0]).numpy()])
    )["logits"]
    np.testing.assert_allclose(
        logits.numpy(),
        keras_outputs(exports["classifier"], exports["converter"], raw[:1])["logits"],
        atol=PARITY_ATOL,
    )
    with pytest.raises(ValueError, match="no output 'logits'.*embedding"):
        aim_export.keras2_layer(exports["backbone_dir"], output="logits")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="keras.layers.TFSMLayer is TF-only")
def test_keras3_tfsm_layer_loads_the_export(exports):
    raw = np.random.RandomState(2).randint(0, 256, (2, 36, 44, 3)).astype("uint8")
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8")
    outputs = keras.layers.TFSMLayer(exports["classifier_dir"], call_endpoint="serving_default")(inputs)
    model = keras.Model(inputs, outputs["probabilities"])
    expected = keras_outputs(exports["classifier"], exports["converter"], raw)
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected["probabilities"], atol=PARITY_ATOL)


def unusual_image_files(folder):
    """Files whose decoding is easy to get wrong: 16-bit grayscale and RGB
    PNG, palette PNG with transparency, grayscale + alpha PNG, CMYK JPEG."""
    import tensorflow as tf
    from PIL import Image

    rng = np.random.RandomState(3)
    gray16 = (rng.rand(38, 45) * 65535).astype(np.uint16)
    rgb8 = rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)
    files = {
        "gray16.png": lambda p: Image.fromarray(gray16).save(p),
        "rgb16.png": lambda p: open(p, "wb").write(tf.io.encode_png(
            rng.randint(0, 65536, (40, 33, 3)).astype(np.uint16)).numpy()),
        "palette.png": lambda p: Image.fromarray(rgb8).convert("P").save(p, transparency=0),
        "gray_alpha.png": lambda p: Image.fromarray(rgb8).convert("LA").save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb8).convert("CMYK").save(p),
    }
    paths = []
    for name, write in files.items():
        write(str(folder / name))
        paths.append(str(folder / name))
    return paths, gray16


def test_unusual_files_decode_alike_for_the_cli_predict_and_the_saved_model(exports, tmp_path):
    """One decoding path: `keras-aim classify`'s reader, `predict` with the
    preprocessor and the SavedModel's `predict_images` give the same pixels
    and logits for every kind of file (a 16-bit PNG used to be clipped to
    white by the command line)."""
    import tensorflow as tf

    paths, gray16 = unusual_image_files(tmp_path)
    names, images, failures = cli.read_images(paths)
    assert names == paths and failures == 0
    np.testing.assert_array_equal(images[0], np.repeat((gray16 >> 8)[..., None], 3, -1))
    served = tf.saved_model.load(exports["classifier_dir"]).signatures["predict_images"]
    for path, image in zip(paths, images):
        assert image.dtype == np.uint8 and image.shape[-1] == 3, path
        expected = exports["classifier"].predict(image[None], verbose=0)
        with open(path, "rb") as handle:
            got = served(image_bytes=tf.constant([handle.read()]))["logits"].numpy()
        np.testing.assert_allclose(got, expected, atol=PARITY_ATOL, err_msg=path)


def test_exported_versions_have_ordinary_permissions(exports, tmp_path):
    """A model server running as another user must be able to read the
    export: every folder and file gets what mkdir/open give under the umask
    (the staging folder it was written into is private)."""
    from keras_aim.utils.atomic_files import atomic_directory, current_umask

    umask = current_umask()
    for key in ("classifier_dir", "backbone_dir"):
        for root, folders, files in os.walk(exports[key]):
            assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask, root
            for name in files:
                mode = os.stat(os.path.join(root, name)).st_mode & 0o777
                assert mode == 0o666 & ~umask, (root, name)
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        with atomic_directory(str(tmp_path / "2")) as staging:
            assert os.stat(staging).st_mode & 0o777 == 0o700  # private while written
        assert os.stat(tmp_path / "2").st_mode & 0o777 == 0o750
    finally:
        os.umask(previous)


def test_existing_version_is_refused_without_overwrite(exports, tmp_path, capsys):
    base = Path(exports["classifier_dir"]).parent
    before = sorted(str(p) for p in base.rglob("*"))
    with pytest.raises(FileExistsError, match="Version 1 already exists.*overwrite=True"):
        aim_export.export_saved_model(exports["classifier"], base, version=1)
    model_file = str(tmp_path / "tiny.keras")
    exports["backbone"].save(model_file)
    code = cli.main(["export", "--model", model_file, "--out", str(base), "--version", "1"])
    assert code == 1
    assert "Version 1 already exists" in capsys.readouterr().err
    assert sorted(str(p) for p in base.rglob("*")) == before
    assert next_version(base) == 2


def test_failed_export_leaves_versions_untouched(exports, tmp_path, monkeypatch):
    base = tmp_path / "served"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"version one")

    def fail_midway(model, path, **kwargs):
        Path(path, "saved_model.pb").write_bytes(b"half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(aim_export, "write_saved_model", fail_midway)
    for version, overwrite in ((None, False), (1, True)):
        with pytest.raises(RuntimeError, match="disk full"):
            aim_export.export_saved_model(
                exports["backbone"], base, version=version, overwrite=overwrite
            )
        assert sorted(p.name for p in base.iterdir()) == ["1"]  # no partial version
        assert (base / "1" / "saved_model.pb").read_bytes() == b"version one"

    def succeed(model, path, **kwargs):
        Path(path, "saved_model.pb").write_bytes(b"version one, again")

    monkeypatch.setattr(aim_export, "write_saved_model", succeed)
    # The swap itself fails: the old version is put back.
    real_rename = os.rename

    def failing_swap(source, destination):
        if ".tmp-" in str(source) and not str(source).endswith(".old"):
            raise OSError("rename failed")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_swap)
    with pytest.raises(OSError, match="rename failed"):
        aim_export.export_saved_model(exports["backbone"], base, version=1, overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert (base / "1" / "saved_model.pb").read_bytes() == b"version one"
    monkeypatch.setattr(os, "rename", real_rename)
    aim_export.export_saved_model(exports["backbone"], base, version=1, overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert (base / "1" / "saved_model.pb").read_bytes() == b"version one, again"
    assert aim_export.export_saved_model(exports["backbone"], base).endswith(os.sep + "2")


def test_empty_batches_and_images_without_pixels_get_a_clear_error(exports):
    """A request with no image, or with images of zero height or width,
    fails with the signature's own message (not a resize or gather error
    from deep inside the graph), on every image signature."""
    import tensorflow as tf

    from keras_aim.export.serving_inputs import EMPTY_BATCH, EMPTY_IMAGE

    signatures = tf.saved_model.load(exports["classifier_dir"]).signatures
    serve = signatures["serving_default"]
    for shape, problem in (((0, 40, 52, 3), EMPTY_BATCH), ((2, 0, 52, 3), EMPTY_IMAGE),
                           ((2, 40, 0, 3), EMPTY_IMAGE), ((0, 0, 0, 3), EMPTY_BATCH)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=problem) as info:
            serve(images=tf.zeros(shape, tf.uint8))
        assert str(list(shape)).replace(",", "") in str(info.value)  # the shape sent
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{EMPTY_BATCH}.*encoded image"):
        signatures["predict_images"](image_bytes=tf.zeros((0,), tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError, match=EMPTY_BATCH):
        signatures["predict_preprocessed"](images=tf.zeros((0, 32, 32, 3), tf.float32))
    # The checks pass everything else through: one 1x1 image is served.
    outputs = serve(images=tf.zeros((1, 1, 1, 3), tf.uint8))
    assert outputs["logits"].shape == (1, exports["classifier"].num_classes)


def test_bad_arguments_are_named(exports, tmp_path):
    with pytest.raises(TypeError, match="image classifier or image backbone.*received Sequential.*model.export"):
        aim_export.export_saved_model(keras.Sequential([keras.layers.Dense(2)]), tmp_path)
    with pytest.raises(ValueError, match="version must be a positive int"):
        aim_export.export_saved_model(exports["backbone"], tmp_path, version=0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        aim_export.export_saved_model(exports["backbone"], tmp_path, top_k=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        aim_export.export_saved_model(exports["backbone"], tmp_path / "file")
    with pytest.raises(ValueError, match="does not match the model's fixed image_shape"):
        aim_export.serving_converter(exports["backbone"], image_size=64)
    assert aim_export.serving_converter(
        make_tiny_backbone(image_shape=(None, None, 3))
    ).image_size == (224, 224)


def test_a_model_path_that_is_not_a_keras_file_is_named(tmp_path, capsys):
    import zipfile

    from keras_aim.loading.keras_files import load_model_file

    archive = tmp_path / "model.keras"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("notes.txt", "not a model")
        handle.writestr("model.weights.h5", b"")
    assert cli.main(["export", "--model", str(archive), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {archive} is not a Keras model file saved with "
                          "model.save(path) (a zip archive holding config.json, ")
    assert "it is a zip archive without config.json (it holds model.weights.h5, notes.txt)" in err
    assert "KeyError" not in err and not (tmp_path / "out").exists()
    (tmp_path / "weights.keras").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="it is an HDF5 file \\(weights only"):
        load_model_file(tmp_path / "weights.keras")
    with pytest.raises(ValueError, match="it is a file of 5 bytes that is not a zip archive"):
        (tmp_path / "text.keras").write_text("hello")
        load_model_file(tmp_path / "text.keras")


@pytest.mark.slow
@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the REST helper and the CLI are backend-independent TF code; the "
    "other passes export through the module fixture",
)
def test_rest_body_gives_the_same_top_k_as_classify(release, tmp_path, capsys):
    from tests.test_cli import write_images
    from tests.tiny_release import NAME

    jpeg, png, _ = write_images(tmp_path)
    out = tmp_path / "served"
    assert cli.main(["export", "--preset", NAME, "--out", str(out), "--probe", "last",
                     "--top-k", "3"]) == 0
    assert str(out / "1") in capsys.readouterr().out
    assert cli.main(["classify", jpeg, png, "--preset", NAME, "--probe", "last",
                     "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = [lines[1:4], lines[5:8]]  # "  1. class 7   0.1234" per rank

    body = aim_export.rest_request_body([Path(jpeg).read_bytes(), Path(png).read_bytes()])
    assert body["signature_name"] == "predict_images"
    assert set(body["instances"][0]) == {"b64"}
    response = aim_export.predict_rest_body(str(out / "1"), body)
    assert len(response["predictions"]) == 2
    for prediction, ranks in zip(response["predictions"], printed):
        assert prediction["top_k_indices"] == [int(line.split()[2]) for line in ranks]
        np.testing.assert_allclose(
            prediction["top_k_scores"], [float(line.split()[-1]) for line in ranks], atol=1e-4
        )
    with pytest.raises(ValueError, match='"instances"'):
        aim_export.predict_rest_body(str(out / "1"), {"instances": [[1, 2]]})

    # The trunk of the same preset, as the next version.
    assert cli.main(["export", "--preset", NAME, "--backbone", "--out", str(out)]) == 0
    response = aim_export.predict_rest_body(str(out / "2"), body)
    assert sorted(response["predictions"][0]) == ["embedding", "tokens"]
    assert np.array(response["predictions"][1]["tokens"]).shape == (16, 64)
