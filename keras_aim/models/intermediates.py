"""`forward_intermediates`: the feature API of timm's vision transformers,
shared by every model family's backbone and classifier.

    out = backbone.forward_intermediates(images, indices=[-4, -1], output_fmt="NHWC")
    out["intermediates"]   # 2 x (B, h, w, D): outputs of the last-but-3 and last blocks
    out["embedding"]       # (B, h, w, D): the input of the first block
    out["final"]           # (B, h, w, D): the trunk's output (after its final norm)

    out = classifier.forward_intermediates(images)
    out["pre_logits"]      # (B, D): the head's pooled features, before its last Dense
    out["logits"]          # (B, num_classes)

A family joins by mixing `TrunkIntermediates` into its backbone and
`ClassifierIntermediates` into its classifier and providing the few hooks
each names (a family whose trunk has no final norm, or whose head pools
differently, still fits: the hooks say how).
"""

from __future__ import annotations

from typing import Sequence, Union

from keras import ops

Indices = Union[int, Sequence[int], None]
OUTPUT_FORMATS = ("NLC", "NHWC", "NCHW")


class TrunkIntermediates:
    """`forward_intermediates` for a ViT trunk without class tokens.

    The backbone provides:
        num_layers, patch_size: ints.
        normalize_block_indices(indices) -> list of non-negative ints
            (raising for bad ones).
        trunk_intermediates(images, last_block) -> (embedding, outputs):
            the input of the first block `(B, N, D)` and the outputs of
            blocks `0..last_block` (a list), running no further block.
        final_norm(tokens) -> tokens: the norm after the last block.
    """

    def resolve_intermediate_indices(self, indices: Indices) -> list[int]:
        """timm's `indices`: `None` for every block, an int n for the last n
        blocks, or block indices (negative count from the end)."""
        if indices is None:
            return list(range(self.num_layers))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 1 <= indices <= self.num_layers:
                raise ValueError(
                    f"indices={indices} asks for the last {indices} blocks of a "
                    f"{self.num_layers}-block trunk; use 1..{self.num_layers}, "
                    "or a list of block indices."
                )
            return list(range(self.num_layers - indices, self.num_layers))
        if isinstance(indices, str) or not isinstance(indices, Sequence):
            raise TypeError(
                "indices must be None, an int (the last n blocks) or a list of "
                f"block indices; received {indices!r}."
            )
        return self.normalize_block_indices(list(indices))

    def forward_intermediates(
        self,
        images,
        indices: Indices = None,
        *,
        norm: bool = False,
        output_fmt: str = "NLC",
        stop_early: bool = False,
        intermediates_only: bool = False,
    ):
        """Outputs of chosen transformer blocks, as timm's
        `forward_intermediates` returns them.

        Args:
            images: `(B, H, W, C)` normalized images, H and W multiples of
                the patch size (any such size).
            indices: blocks to return: `None` for all, an int n for the
                last n, or block indices (negative count from the end).
            norm: pass each block output through the trunk's final norm.
            output_fmt: `"NLC"`: tokens `(B, N, D)` in raster order;
                `"NHWC"`: a grid `(B, H/p, W/p, D)`; `"NCHW"`: `(B, D, H/p, W/p)`.
            stop_early: run no block after the last requested one (then
                `"final"` is left out unless that is the last block).
            intermediates_only: return only the list of block outputs.

        Returns:
            The list of block outputs (in the order of `indices`) if
            `intermediates_only`, else a dict: `"intermediates"` (that
            list), `"embedding"` (the input of the first block: patch
            embedding plus position embedding, never normed) and `"final"`
            (the trunk's output after its final norm, what calling the
            backbone returns), all in `output_fmt`.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}; "
                f"received {output_fmt!r}."
            )
        self.check_images(images)
        wanted = self.resolve_intermediate_indices(indices)
        last = self.num_layers - 1
        if stop_early or intermediates_only:
            last = max(wanted, default=-1)
        embedding, outputs = self.trunk_intermediates(images, last)
        picked = [outputs[i] for i in wanted]
        if norm:
            picked = [self.final_norm(x) for x in picked]
        as_format = lambda x: tokens_to_format(x, images, self.patch_size, output_fmt)  # noqa: E731
        picked = [as_format(x) for x in picked]
        if intermediates_only:
            return picked
        result = {"intermediates": picked, "embedding": as_format(embedding)}
        if last == self.num_layers - 1:
            result["final"] = as_format(self.final_norm(outputs[-1]))
        return result


class ClassifierIntermediates:
    """`forward_intermediates` for an image classifier: its backbone's, plus
    the head's pooled features (`pre_logits`) and the logits.

    The classifier provides:
        backbone: a backbone with `TrunkIntermediates`.
        head_blocks: the block indices its head reads.
        pre_logits(block_outputs) -> (B, D): the head up to its last Dense,
            given `{block index: (B, N, D)}` for every index of
            `head_blocks`.
        logits_from_pre_logits(pre_logits) -> (B, num_classes).
    """

    def forward_intermediates(
        self,
        images,
        indices: Indices = None,
        *,
        norm: bool = False,
        output_fmt: str = "NLC",
        stop_early: bool = False,
        intermediates_only: bool = False,
        training: bool = False,
    ):
        """The backbone's `forward_intermediates`, with the head's outputs.

        Args and the backbone's keys as in `TrunkIntermediates`; the trunk
        runs up to the last block that the requested indices or the head
        need (a classifier's head never reads the trunk's final norm, so
        there is no `"final"`).

        Returns:
            With `intermediates_only`, the list of block outputs; else a
            dict with `"intermediates"`, `"embedding"`, `"pre_logits"`
            `(B, D)` (the head's pooled features before its last Dense layer,
            timm's `forward_head(x, pre_logits=True)`) and `"logits"`
            `(B, num_classes)` (what calling the classifier returns).
        """
        backbone = self.backbone
        if intermediates_only:
            return backbone.forward_intermediates(
                images, indices, norm=norm, output_fmt=output_fmt,
                stop_early=stop_early, intermediates_only=True,
            )
        wanted = backbone.resolve_intermediate_indices(indices)
        head_blocks = list(self.head_blocks)
        # One pass over the trunk: the requested blocks and the head's.
        blocks = sorted(set(wanted) | set(head_blocks))
        outputs = backbone.forward_intermediates(
            images, blocks, output_fmt="NLC", stop_early=True
        )
        by_index = dict(zip(blocks, outputs["intermediates"]))
        pre_logits = self.pre_logits({i: by_index[i] for i in head_blocks}, training)
        picked = [by_index[i] for i in wanted]
        if norm:
            picked = [backbone.final_norm(x) for x in picked]
        as_format = lambda x: tokens_to_format(x, images, backbone.patch_size, output_fmt)  # noqa: E731
        return {
            "intermediates": [as_format(x) for x in picked],
            "embedding": as_format(outputs["embedding"]),
            "pre_logits": pre_logits,
            "logits": self.logits_from_pre_logits(pre_logits),
        }


def tokens_to_format(tokens, images, patch_size: int, output_fmt: str):
    """Raster-order tokens `(B, N, D)` of `images` `(B, H, W, C)` as
    `"NLC"` (unchanged), `"NHWC"` `(B, H/p, W/p, D)` or `"NCHW"`."""
    if output_fmt == "NLC":
        return tokens
    shape = ops.shape(images)
    grid = ops.reshape(
        tokens,
        (ops.shape(tokens)[0], shape[1] // patch_size, shape[2] // patch_size,
         tokens.shape[-1]),
    )
    if output_fmt == "NCHW":
        return ops.transpose(grid, (0, 3, 1, 2))
    return grid
