"""The project's root error type and the merging engine's error family.

`UmmError` is the root of every error a user can cause with bad input; the CLI turns any
`UmmError` into one `Error: ...` line and exit code 2. `protocol` and `node` derive their own
families from it.
"""


class UmmError(Exception):
    """Bad input from a user or a peer: the message is one sentence naming what is wrong."""


class MergeError(UmmError):
    """A merge cannot be carried out as configured."""


class ConfigError(MergeError):
    """A merge configuration is malformed: an unknown key, method or parameter, or a bad value."""


class ShapeMismatchError(MergeError):
    """Input models disagree on a tensor's shape, or on their architecture."""


class MissingTensorError(MergeError):
    """A tensor the merge needs is absent from an input model."""


class NonFiniteError(MergeError):
    """A NaN or infinite value was found in an input or an output tensor."""
