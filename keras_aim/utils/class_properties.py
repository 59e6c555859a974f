"""`classproperty`: a read-only attribute computed from the class.

keras-hub lists a model's presets as the class property `presets`; its own
descriptor is private (`keras_hub.src.utils`), so keras_aim has this
four-line one.
"""

from __future__ import annotations


class classproperty(property):
    """Like `property`, but read on the class: `Model.presets`."""

    def __get__(self, instance, owner):
        return self.fget(owner)
