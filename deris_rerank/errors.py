"""Exceptions for mistakes a user can fix.

Each message is one line that names the input and says what to do. The CLI prints
these without a traceback and exits non-zero; anything else is a bug and keeps its
traceback.
"""


def install_hint(extra: str, packages: str = "") -> str:
    """How to install this package's optional extra `extra`. The package is not on PyPI, so from
    its checkout; `packages`, when given, are the extra's packages in pip's spelling, an alternative.

    install_hint("ray", '"ray[data]>=2.60"') -> 'pip install -e ".[ray]" in the deris-rerank
    checkout (or pip install "ray[data]>=2.60")'
    """
    command = f'pip install -e ".[{extra}]" in the deris-rerank checkout'
    return f"{command} (or pip install {packages})" if packages else command


class DerisRerankError(Exception):
    """Base class for user-facing errors (bad input, missing or wrong files)."""


class CheckpointError(DerisRerankError):
    """A checkpoint is missing, unsafe to read, or does not fit the model."""


class InputError(DerisRerankError):
    """An input tensor, image or text does not have the expected form."""


class OutputError(DerisRerankError):
    """An output file or folder cannot be written."""


class OutputMismatchError(OutputError):
    """An output folder or cache holds results made with other settings or for other inputs."""


class EmbeddedDefaultWarning(UserWarning):
    """The embedded default model (trained on synthetic RefShapes scenes only) is in use."""


class UnknownWordsWarning(UserWarning):
    """Words of an expression are outside the tokenizer's vocabulary (they become <unk>)."""



class SlowDtypeWarning(UserWarning):
    """A reduced-precision dtype was asked for on a processor that has no native instructions for it."""
