"""Per-device memory of AIM pre-training on a device mesh, computed (no
model is built): parameters, optimizer state, gradients and activations;
and the analytic FLOPs of a forward pass and a pre-training step
(`forward_flops`, `step_flops`), which the benchmarks and the scaling
study's cost estimate use.

The sharding follows `keras_aim.distribution.layout_map`: the large kernels
are split over the model axis, everything else is replicated; the batch is
split over the batch axis (and into `accumulate` micro-batches).

Bytes per parameter (Keras keeps float32 variables in both precisions):

| precision | weights used in compute | optimizer state | gradients |
|---|---|---|---|
| fp32 | 4 (the variables) | 8 (AdamW m, v) | 4 |
| bf16 (`mixed_bfloat16`) | 2 (bf16 copies) | 12 (fp32 master variables + m, v) | 4 |

plus 4 for the gradient accumulators with `accumulate > 1`.

Activations kept for the backward pass, per token, in elements of the
compute dtype (D trunk width, h heads, N tokens, W pixel-head width,
t model-axis size), without rematerialization:

- each trunk block: `6D` replicated (each LayerNorm's input, normalized
  input and output) + `(3D + D + 3 * 4D) / t` (q, k, v, attention output,
  the MLP hidden layer before, inside and after GELU) + `3hN / t`
  (attention logits, masked logits, probabilities);
- each pixel-head block: `5W` (its two LayerNorms, the residual) +
  `3 * 4W / t` (the MLP hidden layer);
- once: the image patches (3 p²C, input, targets and errors), `6D`
  (patch embedding, post-trunk norm) and `4W + p²C` (pixel head ends).

With remat, each block keeps only its input (`D` or `W` per token) and the
one block being recomputed holds its full activations. (XLA:CPU does not
lower the peak with remat: its scheduler keeps the recomputed activations
alive; the remat figures are for GPU/TPU compilers.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GIB = 1024**3
PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "mixed_bfloat16": "bf16"}
# Headroom for compiler workspace, fragmentation and the framework itself:
# a plan "fits" when its total is at most this fraction of device memory.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class PretrainingShape:
    """The architecture of an `AIMPretrainer` (trunk + pixel head)."""

    hidden_dim: int
    num_layers: int
    num_heads: int
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    mlp_ratio: float = 4.0
    pixel_head_width: int = 2048
    pixel_head_depth: int = 12
    pixel_head_mlp_ratio: float = 4.0

    @classmethod
    def from_config(cls, config: dict) -> "PretrainingShape":
        """From a recipe config (`recipes/configs/*.py`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_values(self) -> int:
        return self.patch_size**2 * self.num_channels


def parameter_counts(shape: PretrainingShape) -> tuple[int, int]:
    """`(split over the model axis, replicated)` parameter counts of the
    trunk and pixel head, as the layout map shards them."""
    d, w, p = shape.hidden_dim, shape.pixel_head_width, shape.patch_values
    d_mlp = int(d * shape.mlp_ratio)
    w_mlp = int(w * shape.pixel_head_mlp_ratio)
    # qkv, proj, fc1, fc2 | norm_1, norm_2
    split = shape.num_layers * (3 * d * d + d * d + 2 * d * d_mlp)
    replicated = shape.num_layers * 4 * d
    split += p * d  # patch-embedding kernel
    replicated += d + 2 * d + 2 * d  # its bias, its norm, post_trunk_norm
    split += shape.pixel_head_depth * 2 * w * w_mlp  # head fc1, fc2
    replicated += shape.pixel_head_depth * 4 * w  # head norms
    split += d * w + w * p  # input and output projections
    replicated += w + 2 * w + p  # their biases, final norm
    return split, replicated


def activation_elements(shape: PretrainingShape, model_axis: int, remat: bool) -> float:
    """Activation elements kept for the backward pass, per image, on one
    device of a model axis of size `model_axis` (see the module doc)."""
    d, w, t = shape.hidden_dim, shape.pixel_head_width, model_axis
    n, heads = shape.num_tokens, shape.num_heads
    d_mlp = d * shape.mlp_ratio
    w_mlp = w * shape.pixel_head_mlp_ratio
    trunk_block = 6 * d + (4 * d + 3 * d_mlp + 3 * heads * n) / t
    head_block = 5 * w + 3 * w_mlp / t
    once = 3 * shape.patch_values + 6 * d + 4 * w + shape.patch_values
    if remat:
        kept = shape.num_layers * d + shape.pixel_head_depth * w
        kept += max(trunk_block, head_block if shape.pixel_head_depth else 0)
    else:
        kept = shape.num_layers * trunk_block + shape.pixel_head_depth * head_block
    return n * (kept + once)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device."""

    parameters: float
    optimizer_state: float
    gradients: float
    activations: float
    micro_batch_per_device: int

    @property
    def total(self) -> float:
        return self.parameters + self.optimizer_state + self.gradients + self.activations

    def fits(self, device_bytes: float) -> bool:
        """Whether the total is within `USABLE_FRACTION` of `device_bytes`."""
        return self.total <= USABLE_FRACTION * device_bytes


def plan_memory(
    shape: PretrainingShape,
    batch_axis: int,
    model_axis: int,
    global_batch: int,
    precision: str = "bf16",
    remat: bool = False,
    accumulate: int = 1,
) -> MemoryPlan:
    """Per-device memory of one training step of `shape` on a
    `batch_axis x model_axis` mesh with `global_batch` images per optimizer
    update (split into `accumulate` micro-batches)."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; use one of {sorted(PRECISIONS)}."
        )
    precision = PRECISIONS[precision]
    if global_batch % (batch_axis * accumulate):
        raise ValueError(
            f"Global batch {global_batch} is not divisible by batch axis "
            f"{batch_axis} x accumulate {accumulate}; use a multiple of "
            f"{batch_axis * accumulate}."
        )
    split_dims = {
        "hidden_dim": shape.hidden_dim,
        "MLP width": int(shape.hidden_dim * shape.mlp_ratio),
        "pixel_head_width": shape.pixel_head_width,
    }
    for name, size in split_dims.items():
        if size % model_axis:
            raise ValueError(
                f"The model axis ({model_axis}) must divide the {name} "
                f"({size}), which the layout map splits over it; use a model "
                "axis that divides it (e.g. a power of 2)."
            )
    split, replicated = parameter_counts(shape)
    params = split / model_axis + replicated
    compute_bytes = 4 if precision == "fp32" else 2
    optimizer_bytes = 8 if precision == "fp32" else 12
    gradient_bytes = 4 + (4 if accumulate > 1 else 0)
    micro_batch = global_batch // (batch_axis * accumulate)
    activations = micro_batch * activation_elements(shape, model_axis, remat)
    return MemoryPlan(
        parameters=params * compute_bytes,
        optimizer_state=params * optimizer_bytes,
        gradients=params * gradient_bytes,
        activations=activations * compute_bytes,
        micro_batch_per_device=micro_batch,
    )


def forward_flops(shape: PretrainingShape) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one image's forward pass.

    `trunk`: patch projection, qkv, attention output projection, MLPs;
    `attention`: the two `N x N` products (counted in full, also under the
    causal mask); `pixel_head`: its input projection, MLPs and output
    projection. Norms, softmax and element-wise ops are not counted.
    """
    n, d, pixels = shape.num_tokens, shape.hidden_dim, shape.patch_values
    ratio, depth = shape.mlp_ratio, shape.num_layers
    trunk = 2 * n * pixels * d + depth * 2 * n * d * d * (4 + 2 * ratio)
    attention = depth * 4 * n * n * d
    w = shape.pixel_head_width
    head = (2 * n * d * w + shape.pixel_head_depth * 4 * n * w * w * shape.pixel_head_mlp_ratio
            + 2 * n * w * pixels)
    return {"trunk": trunk, "attention": attention, "pixel_head": head}


def step_flops(shape: PretrainingShape) -> dict[str, float]:
    """FLOPs per image: `inference` (trunk, full attention) and `train`, a
    pre-training step (trunk + pixel head, forward + backward = 3x the
    forward)."""
    f = forward_flops(shape)
    return {"inference": f["trunk"] + f["attention"],
            "train": 3 * (f["trunk"] + f["attention"] + f["pixel_head"])}
