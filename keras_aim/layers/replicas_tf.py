"""Where a `tf.distribute` replica's rows sit in the global batch
(TensorFlow only; imported lazily by layers that draw a random value per
image of the global batch, so that every image gets the draw it would get
on one device)."""

from __future__ import annotations

import tensorflow as tf


def replica_position():
    """`(this replica's index, replicas in sync)`: under MirroredStrategy
    and MultiWorkerMirroredStrategy, replica i holds rows
    `[i * b, (i + 1) * b)` of each global batch of `replicas * b`. `(0, 1)`
    outside a multi-replica step."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync
