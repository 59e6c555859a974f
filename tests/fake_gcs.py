"""gs:// URLs served by a local folder, for testing remote checkpoint paths
without a network (tests only).

Inside `fake_gcs(root)`, `gs://BUCKET/PATH` is `root/BUCKET/PATH`:
- etils.epath (what Orbax and keras_aim use for folders and small files) is
  redirected with its own test helper, `etils.epath.testing.mock_epath`;
- Orbax writes arrays with TensorStore, whose GCS key-value store is swapped
  for its local-file one at the same place.

Orbax keeps treating the paths as GCS paths, so it uses its GCS protocol
(no renames: a checkpoint is complete once its commit marker is written).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from unittest import mock

_RENAMING = ("rename", "replace", "copy")
_FUNCTIONS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir",
              "open", "remove", "rename", "replace", "rmtree", "stat", "walk")


@contextlib.contextmanager
def fake_gcs(root: str):
    from etils.epath import gpath
    from etils.epath import testing as epath_testing
    from orbax.checkpoint._src.path import gcs_utils

    def local(path) -> str:
        path = os.fspath(path)
        return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path

    def redirected(name):
        def function(original, path, *args, **kwargs):
            if name in _RENAMING:
                return original(local(path), local(args[0]), *args[1:], **kwargs)
            result = original(local(path), *args, **kwargs)
            if name == "glob":  # local names back to gs:// URLs
                prefix = os.path.join(root, "")
                return ["gs://" + r[len(prefix):] if r.startswith(prefix) else r
                        for r in result]
            return result
        return function

    def rmtree(path, missing_ok=False):
        shutil.rmtree(local(path), ignore_errors=missing_ok)

    with contextlib.ExitStack() as stack:
        # epath picks TensorFlow's GCS client whenever TensorFlow is installed,
        # past mock_epath's backends.
        stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
        stack.enter_context(epath_testing.mock_epath(**{n: redirected(n) for n in _FUNCTIONS}))
        stack.enter_context(mock.patch.object(
            gcs_utils, "get_kvstore_for_gcs",
            lambda path: {"driver": "file", "path": local(path)}))
        stack.enter_context(mock.patch.object(gcs_utils, "rmtree", rmtree))
        stack.enter_context(mock.patch.object(
            gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
        yield
