"""The benchmarks compare like with like: the plain PyTorch AIM of
benchmarks/torch_reference_aim.py computes what keras_aim computes."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.layers import prefix_causal_mask
from keras_aim.training.losses import next_patch_pixel_loss
from tests.conftest import needs_torch_backend, to_numpy

needs_jax_backend = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="XLA:CPU options: JAX pass only"
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Small, but with every part: 2 blocks, 2 heads, a 2-block pixel head.
CONFIG = dict(image_shape=(32, 32, 3), patch_size=8, hidden_dim=32, num_layers=2, num_heads=2)
HEAD = dict(pixel_head_width=48, pixel_head_depth=2)


@pytest.fixture
def torch_reference(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch_reference_aim

    return torch_reference_aim


def _pretrainer():
    keras.utils.set_random_seed(3)
    return keras_aim.AIMPretrainer(keras_aim.AIMBackbone(**CONFIG), seed=1, **HEAD)


def _torch_twin(torch_reference, pretrainer):
    backbone = pretrainer.backbone
    model = torch_reference.TorchAIM(
        image_size=32, patch_size=8, hidden_dim=32, num_layers=2, num_heads=2,
        head_width=HEAD["pixel_head_width"], head_depth=HEAD["pixel_head_depth"],
    )
    torch_reference.copy_keras_weights(model, backbone, pretrainer.pixel_head)
    return model


@needs_torch_backend
def test_torch_reference_matches_keras_outputs_and_loss(torch_reference):
    import torch

    pretrainer = _pretrainer()
    model = _torch_twin(torch_reference, pretrainer)
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    prefix = np.array([1, 7, 15], dtype="int32")
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    with torch.no_grad():
        tokens = model(nchw).numpy()
        predictions = model.pretraining_outputs(nchw, torch.from_numpy(prefix).long())
        loss = torch_reference.pixel_loss(nchw, predictions, torch.from_numpy(prefix).long(), 8)
    np.testing.assert_allclose(tokens, to_numpy(pretrainer.backbone(images)), atol=1e-4)

    mask = prefix_causal_mask(prefix, 16)
    keras_tokens = pretrainer.backbone.encode(images, attention_mask=mask)
    keras_predictions = pretrainer.pixel_head(keras_tokens, grid=(4, 4))
    np.testing.assert_allclose(predictions.numpy(), to_numpy(keras_predictions), atol=1e-4)
    keras_loss = next_patch_pixel_loss(images, keras_predictions, prefix, 8)
    np.testing.assert_allclose(float(loss), float(to_numpy(keras_loss)), rtol=1e-5)


@needs_torch_backend
def test_torch_reference_train_step_matches_keras(torch_reference):
    """One optimizer step from the same weights and prefix lengths gives the
    same loss, and the same loss afterwards (same update)."""
    import torch

    pretrainer = _pretrainer()
    model = _torch_twin(torch_reference, pretrainer)
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    pretrainer.compile()
    seed_state = to_numpy(pretrainer.prefix_sampler.seed_generator.state)
    prefix = to_numpy(pretrainer.prefix_sampler(images, training=True))
    pretrainer.prefix_sampler.seed_generator.state.assign(seed_state)  # same draw
    keras_loss = pretrainer.train_on_batch(images, return_dict=True)["loss"]

    optimizer = torch_reference.make_optimizer(model)
    loss = torch_reference.train_step(
        model, optimizer, nchw, prefix_lengths=torch.from_numpy(prefix).long()
    )
    np.testing.assert_allclose(float(loss), keras_loss, rtol=1e-5)

    # The same update (learning rate 1e-3: each weight moved by ~1e-3).
    pairs = [
        (model.blocks[0].attn.qkv.weight.T, pretrainer.backbone.blocks[0].attn.qkv.kernel),
        (model.blocks[1].mlp.fc2.weight.T, pretrainer.backbone.blocks[1].mlp.fc2.kernel),
        (model.head_out.bias, pretrainer.pixel_head.output_proj.bias),
    ]
    # Keras adds Adam's epsilon to sqrt(v) before the bias correction,
    # PyTorch after it: steps of weights whose gradients are ~epsilon
    # differ (a few in a thousand), but never by more than one step.
    for torch_weight, keras_weight in pairs:
        difference = np.abs(torch_weight.detach().numpy() - to_numpy(keras_weight))
        assert np.mean(difference < 2e-5) > 0.98
        assert difference.max() < 1e-3


def _throughput_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput

    return throughput


TINY_ARGS = [
    "--image-size", "32", "--patch-size", "8", "--hidden-dim", "32", "--num-layers", "1",
    "--num-heads", "2", "--head-width", "32", "--head-depth", "1", "--batch-size", "2",
    "--runs", "1", "--calls", "1", "--warmup", "1",
]


def test_flop_count_matches_a_hand_count(monkeypatch):
    throughput = _throughput_module(monkeypatch)
    config = dict(image_size=28, patch_size=14, hidden_dim=8, num_layers=2, num_heads=2,
                  head_width=4, head_depth=1, batch_size=1)
    n, d, pixels = 4, 8, 14 * 14 * 3
    per_layer = 2 * n * d * (3 * d) + 2 * n * d * d + 2 * (2 * n * d * 4 * d)
    flops = throughput.forward_flops(config)
    assert flops["trunk"] == 2 * n * pixels * d + 2 * per_layer
    assert flops["attention"] == 2 * (2 * n * n * d) * 2
    head = 2 * n * d * 4 + 2 * (2 * n * 4 * 16) + 2 * n * 4 * pixels
    assert flops["pixel_head"] == head
    steps = throughput.step_flops(config)
    assert steps["train"] == 3 * (flops["trunk"] + flops["attention"] + head)


@pytest.mark.slow  # compiles a training step
def test_keras_worker_measures_this_backend(monkeypatch, capsys):
    """The benchmark's Keras worker runs inference and a pre-training step
    on the current backend and reports times and peak memory."""
    import json

    throughput = _throughput_module(monkeypatch)
    monkeypatch.setenv("KERAS_BACKEND", keras.config.backend())
    target = "keras-" + keras.config.backend()
    throughput.main(["--worker", target, *TINY_ARGS])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert len(result["inference"]) == 1 and result["inference"][0] > 0
    assert len(result["train"]) == 1 and result["train"][0] > 0
    assert result["train_peak"] >= result["inference_peak"] > 0

    case = throughput.parse_case("cpu", throughput.parse_args(TINY_ARGS))
    rows = throughput.table_rows({(target, "float32"): [result]}, case, _rates(1e9))
    assert [(r["target"], r["mode"]) for r in rows] == [(target, "inference"), (target, "train")]
    table = throughput.format_table(rows, markdown=True)
    assert table.count("\n") == 3 and target in table


def _rates(square, **gemm):
    """Matmul rates in `best_rates`' form: JAX and PyTorch at `square` on
    the 2048^3 product, and `gemm` = {framework: {key: rate}}."""
    rates = {f: {"float32": {"square": square}} for f in ("jax", "torch")}
    for framework, values in gemm.items():
        for key, rate in values.items():
            dtype, _, key = key.rpartition("|")
            rates.setdefault(framework, {}).setdefault(dtype or "float32", {})[key] = rate
    return rates


def test_table_reports_the_fastest_process_and_the_range(monkeypatch):
    """Three processes per target, each the median of its runs: the row is
    the fastest process (the ratio to PyTorch eager too), the range spans
    the slowest and the fastest, the median over processes is kept."""
    throughput = _throughput_module(monkeypatch)
    case = throughput.parse_case("cpu", throughput.parse_args(TINY_ARGS))  # batch 2

    def process(*seconds):
        return {"inference": list(seconds), "inference_peak": 1e9}

    results = {("keras-jax", "float32"): [process(0.1, 0.1, 0.9), process(0.4, 0.4),
                                          process(0.2, 0.2)],
               ("torch-eager", "float32"): [process(0.25), process(0.5), process(0.8)]}
    rows = throughput.table_rows(results, case, _rates(1e9))
    jax_row = rows[0]
    flops = throughput.step_flops(case["config"])["inference"]
    assert jax_row["processes"] == 3
    assert jax_row["images_per_s"] == pytest.approx(2 / 0.1)  # 0.9 is one slow run
    assert jax_row["of_matmul"] == pytest.approx(2 / 0.1 * flops / 1e9)
    assert jax_row["of_matmul_min"] == pytest.approx(2 / 0.4 * flops / 1e9)
    assert jax_row["of_matmul_median"] == pytest.approx(2 / 0.2 * flops / 1e9)
    assert jax_row["vs_torch_eager"] == pytest.approx(2.5)
    assert jax_row["of_own_gemm"] is None and jax_row["vs_float32"] is None
    assert throughput.format_table(rows).splitlines()[1].split()[9].count("-") == 1  # the range


def test_rows_compare_with_the_own_gemm_rate_same_dtype_eager_and_float32(monkeypatch):
    """Each row is set against its framework's rate on the case's GEMMs in
    its compute dtype, PyTorch eager in the same dtype and the same target
    in float32; the machine's rate is the fastest of JAX and PyTorch."""
    throughput = _throughput_module(monkeypatch)
    args = throughput.parse_args(TINY_ARGS)
    case = throughput.parse_case("cpu/inference/float32,mixed_bfloat16", args)
    key = f"{case['label']}/inference"
    rates = _rates(1e9, jax={key: 5e8, f"bfloat16|{key}": 2e9},
                   torch={key: 4e8, f"bfloat16|{key}": 8e9},
                   tensorflow={"square": 9e9})
    rates["torch"]["float32"]["square"] = 2e9
    assert throughput.machine_rate(rates) == 2e9  # TensorFlow's 9e9 is not a yardstick

    def process(seconds):
        return [{"inference": [seconds], "inference_peak": 1e9}]

    results = {("keras-jax", "float32"): process(0.2), ("keras-jax", "mixed_bfloat16"):
               process(0.1), ("torch-eager", "float32"): process(0.4),
               ("torch-eager", "mixed_bfloat16"): process(0.05)}
    rows = {(r["target"], r["dtype"]): r for r in throughput.table_rows(results, case, rates)}
    flops = throughput.step_flops(case["config"])["inference"] * 2  # batch 2
    jax32, jax16 = rows["keras-jax", "float32"], rows["keras-jax", "mixed_bfloat16"]
    assert jax32["of_matmul"] == pytest.approx(flops / 0.2 / 2e9)
    assert jax32["of_own_gemm"] == pytest.approx(flops / 0.2 / 5e8)
    assert jax16["of_own_gemm"] == pytest.approx(flops / 0.1 / 2e9)
    assert jax32["vs_torch_eager"] == pytest.approx(2.0)
    assert jax16["vs_torch_eager"] == pytest.approx(0.5)
    assert jax16["vs_float32"] == pytest.approx(2.0) and jax32["vs_float32"] is None
    assert rows["torch-eager", "mixed_bfloat16"]["of_own_gemm"] == pytest.approx(
        flops / 0.05 / 8e9)


def test_best_rates_keep_the_highest_reading(monkeypatch):
    throughput = _throughput_module(monkeypatch)
    readings = {"jax": [{"float32": {"square": 3.0, "a/inference": 2.0}},
                        {"float32": {"square": 4.0, "a/inference": 1.0}}],
                "torch": [{"float32": {"square": 5.0}, "bfloat16": {"square": 9.0}}]}
    rates = throughput.best_rates(readings)
    assert rates == {"jax": {"float32": {"square": 4.0, "a/inference": 2.0}},
                     "torch": {"float32": {"square": 5.0}, "bfloat16": {"square": 9.0}}}
    assert throughput.machine_rate(rates) == 5.0
    assert throughput.machine_rate({"tensorflow": {"float32": {"square": 1.0}}}) is None


def test_cpu_features_come_from_the_flags_line(monkeypatch):
    throughput = _throughput_module(monkeypatch)
    cpuinfo = ("processor\t: 0\nmodel name\t: Some CPU\n"
               "flags\t\t: fpu sse2 avx2 avx512f avx512bw amx_tile\n"
               "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert throughput.cpu_features(cpuinfo) == {
        "AVX2": True, "AVX-512": True, "AVX512_BF16": False, "AMX-BF16": False,
        "AMX-TILE": True}
    assert throughput.describe_cpu(cpuinfo) == (
        "CPU flags: AVX2 yes, AVX-512 yes, AVX512_BF16 no, AMX-BF16 no, AMX-TILE yes")
    assert throughput.cpu_features("processor\t: 0\n") == {}
    assert "not readable" in throughput.describe_cpu("")


def test_gemm_shapes_carry_the_counted_flops(monkeypatch):
    """The GEMMs of inference are the trunk's counted FLOPs; those of a
    training step are 3x trunk + pixel head (each product's two backward
    products have its FLOPs)."""
    throughput = _throughput_module(monkeypatch)
    config = dict(image_size=28, patch_size=14, hidden_dim=8, num_layers=2, num_heads=2,
                  head_width=4, head_depth=1, batch_size=3)
    flops = throughput.forward_flops(config)

    def total(shapes):
        return sum(2 * m * k * n * count for (m, k, n), count in shapes.items())

    inference = throughput.gemm_shapes(config, "inference")
    assert inference == {(12, 588, 8): 1, (12, 8, 24): 2, (12, 8, 8): 2, (12, 8, 32): 2,
                         (12, 32, 8): 2}
    assert total(inference) == 3 * flops["trunk"]
    train = throughput.gemm_shapes(config, "train")
    assert total(train) == 3 * 3 * (flops["trunk"] + flops["pixel_head"])
    assert train[(8, 12, 32)] == 2  # fc1's weight gradient, one per block
    assert throughput.combined_rate({(1, 1, 1): 1.0, (2, 2, 2): 2.0},
                                    {(1, 1, 1): 2, (2, 2, 2): 1}) == pytest.approx(20 / 4)


def test_cases_name_size_batch_modes_and_dtypes(monkeypatch):
    throughput = _throughput_module(monkeypatch)
    args = throughput.parse_args(["--dtype", "float32", "bfloat16", "--hidden-dim", "64"])
    case = throughput.parse_case("aim_600m_6blocks@2/float32/train", args)
    assert case["label"] == "aim_600m_6blocks b2" and case["modes"] == ["train"]
    assert case["dtypes"] == ["float32"] and case["config"]["num_layers"] == 6
    assert case["config"]["hidden_dim"] == 64 and case["config"]["batch_size"] == 2
    default = throughput.parse_case("cpu", args)
    assert default["modes"] == ["inference", "train"]
    assert default["dtypes"] == ["float32", "bfloat16"]
    for wrong in ("nothing", "cpu/inference,float32", "cpu/fast"):
        with pytest.raises(ValueError):
            throughput.parse_case(wrong, args)
    plan = throughput.matmul_plan([case, default])
    assert plan["dtypes"] == ["float32", "bfloat16"]
    assert sorted(plan["sets"]) == ["aim_600m_6blocks b2/train", "cpu b8/inference",
                                    "cpu b8/train"]


def test_matmul_worker_measures_its_framework(monkeypatch):
    """The yardstick's worker times the square product and each named set of
    GEMM shapes in every dtype asked (small sizes here; no timing asserted)."""
    throughput = _throughput_module(monkeypatch)
    monkeypatch.setattr(throughput, "SQUARE", 64)
    framework = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[
        keras.config.backend()]
    sets = {"a/inference": {(16, 8, 24): 2, (16, 24, 8): 1}}
    rates = throughput.matmul_rates(framework, ["float32", "bfloat16"], sets)
    assert sorted(rates) == ["bfloat16", "float32"]
    for values in rates.values():
        assert sorted(values) == ["a/inference", "square"]
        assert all(rate > 0 for rate in values.values())


def test_counts_below_one_are_refused(monkeypatch, capsys):
    throughput = _throughput_module(monkeypatch)
    for flag in ("--repeats", "--runs", "--calls"):
        with pytest.raises(SystemExit):
            throughput.parse_args([flag, "0"])
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert throughput.parse_args(["--warmup", "0"]).warmup == 0


def test_profile_sorts_xla_operations_by_kind(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_step

    kinds = {name: profile_step.operation_kind(name).split(" (")[0] for name in (
        "ynn_fusion.12", "dot.6", "convolution.1", "copy_bitcast_fusion.28",
        "transpose_copy_fusion", "add_bitcast_fusion.3", "wrapped_broadcast", "DevicePut")}
    assert kinds == {
        "ynn_fusion.12": "matrix products", "dot.6": "matrix products",
        "convolution.1": "matrix products", "copy_bitcast_fusion.28": "transposing copies",
        "transpose_copy_fusion": "transposing copies",
        "add_bitcast_fusion.3": "other element-wise / reduction fusions",
        "wrapped_broadcast": "other element-wise / reduction fusions",
        "DevicePut": "runtime"}


def test_profile_reads_onednn_verbose_lines(monkeypatch):
    """TensorFlow's profile sums oneDNN's `primitive,exec` lines by kind and
    problem (both verbose formats) and skips every other line."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_step

    lines = [
        "onednn_verbose,v1,info,oneDNN v3.7.1",
        "onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src_f32::blocked:ab:f0 "
        "wei_f32::blocked:ab:f0 dst_f32::blocked:ab:f0,,,1024x1536:1536x4608,120.5",
        "onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src_f32 wei_f32 dst_f32,,,"
        "1024x1536:1536x4608,79.5",
        "onednn_verbose,primitive,exec,cpu,matmul,brg_matmul:avx512_core,undef,"
        "src:f32 wei:f32 dst:f32,attr-scratchpad:user,,4x12x256x128:4x12x128x256,8.25",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,softmax,jit,forward,,,4x12,0.5",
        "onednn_verbose,v1,primitive,exec,cpu,softmax,jit,forward,,,4x12x256x256,not-a-time",
        "call ms 953.1",
    ]
    assert profile_step.onednn_primitives(lines) == {
        ("gemm_api", "1024x1536:1536x4608"): [200.0, 2],
        ("matmul", "4x12x256x128:4x12x128x256"): [8.25, 1]}
    assert profile_step.product_flops("1024x1536:1536x4608") == 2.0 * 1024 * 1536 * 4608
    assert profile_step.product_flops("4x12x256x128:4x12x128x256") == 2.0 * 48 * 256 * 128 * 256


def test_tensorflow_profile_reads_what_the_calls_write(monkeypatch, capfd):
    """What the timed calls write to file descriptor 1 (where oneDNN logs) is
    read back and split from the call's time; the warm-up's lines are not
    counted, and nothing of them reaches the terminal."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_step

    line = b"onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src,,,64x32:32x16,0.0\n"
    written = []

    def step():
        os.write(1, line)
        written.append(1)

    profile_step.profile_tensorflow("a step", step, calls=3, warmup=2)
    out = capfd.readouterr().out
    assert len(written) == 5
    assert "onednn_verbose" not in out
    assert "a step:" in out and "mean of 3" in out
    assert "gemm_api 64x32:32x16" in out and "all oneDNN primitives" in out
    assert "the rest (TensorFlow kernels, runtime)" in out

    profile_step.profile_tensorflow("no oneDNN", lambda: None, calls=1, warmup=0)
    assert "no oneDNN primitive ran" in capfd.readouterr().out


@needs_jax_backend
def test_every_swept_xla_flag_is_known_to_this_jaxlib(monkeypatch):
    """An XLA_FLAGS entry this jaxlib does not know aborts the process, so
    the sweep's flags are checked here as per-compilation options (which
    raise instead); a made-up option must raise."""
    import jax
    import jax.numpy as jnp

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import xla_cpu_flags

    def compile_with(name, value):
        return jax.jit(lambda a: a * 2, compiler_options={name: value})(jnp.ones(3))

    for flags, _ in xla_cpu_flags.FLAG_SETS[1:]:
        for flag in flags.split():
            name, value = flag.removeprefix("--").split("=", 1)
            compile_with(name, {"true": True, "false": False}.get(value, value))
    with pytest.raises(Exception, match="xla_cpu_made_up_option"):
        compile_with("xla_cpu_made_up_option", True)


@needs_torch_backend
def test_torch_worker_runs_eager(monkeypatch, capsys):
    import json

    throughput = _throughput_module(monkeypatch)
    throughput.main(["--worker", "torch-eager", *TINY_ARGS])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["inference"][0] > 0 and result["train"][0] > 0


def test_flash_attention_setting_reaches_the_attention_op():
    """`flash_attention=True` is passed to keras.ops.dot_product_attention,
    which refuses it on a CPU; False runs and changes nothing."""
    layer = keras_aim.layers.AIMAttention(32, 2)
    x = np.random.default_rng(0).normal(size=(2, 16, 32)).astype("float32")
    expected = to_numpy(layer(x))
    layer.flash_attention = False
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-6)
    layer.flash_attention = True
    with pytest.raises((RuntimeError, ValueError, ImportError)):
        layer(x)
