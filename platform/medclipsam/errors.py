"""Errors that name the file or row at fault, so a user can act on them."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), at most 300 characters.

    Libraries' messages often run to many lines (server responses, C++ locations); a sentence for the
    user takes the first.
    """
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: first line of its message`` (at most 300 characters): a cause fit for one sentence."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc)}"[:300] if text else type(exc).__name__


class MedClipSamError(Exception):
    """Base class for errors this package raises on purpose."""

    exit_code = 2  # the command line's code for it: a usage or input error


class InputError(MedClipSamError):
    """An input file or value cannot be used; the message names it and the problem."""


class PromptError(MedClipSamError):
    """A prompt (box or point) is malformed or does not fit its image."""


class ModelError(MedClipSamError):
    """A model or checkpoint cannot be found, read or built."""


class StorageUnavailable(MedClipSamError):
    """The object store did not answer through the whole retry budget (down, restarting, overloaded).

    Not the user's input: exit code 1, and a rerun once the store is back resumes the work.
    """

    exit_code = 1
