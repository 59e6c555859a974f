"""AIM written in plain PyTorch, the baseline of `throughput.py`.

The same architecture and pre-training step as keras_aim (and as Apple's
released code, which is plain PyTorch eager with
`F.scaled_dot_product_attention`): trunk, pixel head, normalized-pixel
loss with prefix-causal attention, AdamW with global-norm clipping.
`copy_keras_weights` puts a keras_aim model's weights into it, so that
tests can check both compute the same outputs and loss.

Images are NCHW here (the PyTorch convention); the Keras model takes NHWC.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """`(rows * cols, dim)` raster-order 2-D sin-cos embedding: channels
    `[0, dim/2)` encode the column, `[dim/2, dim)` the row."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(n):
        angles = torch.arange(n, dtype=torch.float32)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    col = encode(cols)[None].expand(rows, cols, dim // 2)
    row = encode(rows)[:, None].expand(rows, cols, dim // 2)
    return torch.cat([col, row], dim=-1).reshape(rows * cols, dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask=None):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class HeadBlock(nn.Module):
    """The pixel head's block: attention replaced by the identity."""

    def __init__(self, dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.norm_1(x)
        return x + self.mlp(self.norm_2(x))


class TorchAIM(nn.Module):
    """Trunk (+ pixel head when `head_depth > 0`).

    `forward(images)` -> `(B, N, D)` post-trunk-norm tokens (full attention);
    `pretraining_outputs(images, prefix_lengths)` -> `(B, N, p*p*C)` pixel
    predictions under the prefix-causal mask.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        head_width: int,
        head_depth: int,
        mlp_ratio: float = 4.0,
        layer_norm_epsilon: float = 1e-6,
        head_layer_norm_epsilon: float = 1e-5,
        channels: int = 3,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.conv = nn.Conv2d(channels, hidden_dim, patch_size, patch_size)
        self.patch_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_epsilon)
        self.register_buffer("position", sincos_2d(self.grid, self.grid, hidden_dim))
        self.blocks = nn.ModuleList(
            Block(hidden_dim, num_heads, mlp_ratio, layer_norm_epsilon)
            for _ in range(num_layers)
        )
        self.post_trunk_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_epsilon)
        self.has_head = head_depth > 0
        if self.has_head:
            self.head_in = nn.Linear(hidden_dim, head_width)
            self.register_buffer(
                "head_position", sincos_2d(self.grid, self.grid, head_width)
            )
            self.head_blocks = nn.ModuleList(
                HeadBlock(head_width, mlp_ratio, head_layer_norm_epsilon)
                for _ in range(head_depth)
            )
            self.head_norm = nn.LayerNorm(head_width, eps=head_layer_norm_epsilon)
            self.head_out = nn.Linear(head_width, patch_size**2 * channels)

    def trunk(self, images, mask=None):
        x = self.conv(images).flatten(2).transpose(1, 2)  # (B, N, D) raster order
        x = self.patch_norm(x) + self.position
        for block in self.blocks:
            x = block(x, mask)
        return self.post_trunk_norm(x)

    def forward(self, images):
        return self.trunk(images)

    def pretraining_outputs(self, images, prefix_lengths):
        tokens = self.trunk(images, prefix_causal_mask(prefix_lengths, self.num_patches))
        x = self.head_in(tokens) + self.head_position
        for block in self.head_blocks:
            x = block(x)
        return self.head_out(self.head_norm(x))


def prefix_causal_mask(prefix_lengths, n: int):
    """`(B, 1, N, N)` boolean: key j visible to query i iff j <= i or j < S."""
    positions = torch.arange(n, device=prefix_lengths.device)
    causal = positions[None, :] <= positions[:, None]
    in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]
    return (causal[None] | in_prefix)[:, None]


def pixel_loss(images, predictions, prefix_lengths, patch_size: int):
    """keras_aim's `next_patch_pixel_loss` for NCHW images."""
    b, c, h, w = images.shape
    r, s = h // patch_size, w // patch_size
    patches = (
        images.reshape(b, c, r, patch_size, s, patch_size)
        .permute(0, 2, 4, 3, 5, 1)
        .reshape(b, r * s, patch_size * patch_size * c)
    )
    mean = patches.mean(-1, keepdim=True)
    targets = (patches - mean) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    errors = (predictions[:, :-1].float() - targets[:, 1:]).square().mean(-1)
    positions = torch.arange(1, r * s, device=images.device)
    counted = (positions[None] >= prefix_lengths[:, None]).float()
    return (errors * counted).sum() / counted.sum().clamp_min(1.0)


def make_optimizer(model: nn.Module, learning_rate: float = 1e-3):
    """keras_aim's `pretraining_optimizer()`: AdamW (0.9, 0.95, eps 1e-8),
    weight decay 0.05 except biases and norms (and clipping in the step)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim == 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": 0.05},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)


class PretrainingLoss(nn.Module):
    """`(images, prefix_lengths)` -> the pre-training loss of `model` (a
    module, so that `torch.compile` can compile forward and backward)."""

    def __init__(self, model: TorchAIM):
        super().__init__()
        self.model = model

    def forward(self, images, prefix_lengths):
        predictions = self.model.pretraining_outputs(images, prefix_lengths)
        return pixel_loss(images, predictions, prefix_lengths, self.model.patch_size)


def train_step(model, optimizer, images, prefix_lengths=None, loss_fn=None):
    """One pre-training step: prefix lengths (random in [1, N-1] unless
    given), forward, loss (`loss_fn`, default `PretrainingLoss(model)`),
    backward, global-norm clipping 1.0, AdamW update. Returns the loss."""
    prefix = prefix_lengths
    if prefix is None:
        prefix = torch.randint(1, model.num_patches, (images.shape[0],), device=images.device)
    loss = (loss_fn if loss_fn is not None else PretrainingLoss(model))(images, prefix)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


# --- Weights from keras_aim ------------------------------------------------


def _dense(linear: nn.Linear, layer) -> None:
    linear.weight.copy_(torch.from_numpy(layer.kernel).T)
    if linear.bias is not None:
        linear.bias.copy_(torch.from_numpy(layer.bias))


def _norm(norm: nn.LayerNorm, layer) -> None:
    norm.weight.copy_(torch.from_numpy(layer.gamma))
    norm.bias.copy_(torch.from_numpy(layer.beta))


def _mlp(mlp: MLP, layer) -> None:
    _dense(mlp.fc1, layer.fc1)
    _dense(mlp.fc2, layer.fc2)


@torch.no_grad()
def copy_keras_weights(model: TorchAIM, backbone, pixel_head=None) -> None:
    """Copies an `AIMBackbone` (and an `AIMPixelHead`) into `model`.

    The Keras variables are read as NumPy arrays (any backend)."""
    import keras

    numpy = keras.ops.convert_to_numpy

    conv = backbone.patch_embedding.proj
    model.conv.weight.copy_(torch.from_numpy(numpy(conv.kernel).transpose(3, 2, 0, 1).copy()))
    model.conv.bias.copy_(torch.from_numpy(numpy(conv.bias)))
    _norm(model.patch_norm, _NumpyLayer(backbone.patch_embedding.norm, numpy))
    for block, layer in zip(model.blocks, backbone.blocks, strict=True):
        _norm(block.norm_1, _NumpyLayer(layer.norm_1, numpy))
        _norm(block.norm_2, _NumpyLayer(layer.norm_2, numpy))
        _dense(block.attn.qkv, _NumpyLayer(layer.attn.qkv, numpy))
        _dense(block.attn.proj, _NumpyLayer(layer.attn.proj, numpy))
        _mlp(block.mlp, _NumpyMLP(layer.mlp, numpy))
    _norm(model.post_trunk_norm, _NumpyLayer(backbone.post_trunk_norm, numpy))
    if pixel_head is None:
        return
    _dense(model.head_in, _NumpyLayer(pixel_head.input_proj, numpy))
    for block, layer in zip(model.head_blocks, pixel_head.blocks, strict=True):
        _norm(block.norm_1, _NumpyLayer(layer.norm_1, numpy))
        _norm(block.norm_2, _NumpyLayer(layer.norm_2, numpy))
        _mlp(block.mlp, _NumpyMLP(layer.mlp, numpy))
    _norm(model.head_norm, _NumpyLayer(pixel_head.final_norm, numpy))
    _dense(model.head_out, _NumpyLayer(pixel_head.output_proj, numpy))


class _NumpyLayer:
    """A Keras Dense / LayerNormalization's variables as NumPy arrays."""

    def __init__(self, layer, numpy):
        for name in ("kernel", "bias", "gamma", "beta"):
            value = getattr(layer, name, None)
            setattr(self, name, None if value is None else np.ascontiguousarray(numpy(value)))


class _NumpyMLP:
    def __init__(self, layer, numpy):
        self.fc1 = _NumpyLayer(layer.fc1, numpy)
        self.fc2 = _NumpyLayer(layer.fc2, numpy)
