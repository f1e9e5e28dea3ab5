"""Errors that name the file or row at fault, so a user can act on them."""


MESSAGE_LIMIT = 300  # characters of a library's message kept in one of ours


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` in at most ``limit`` characters, cut at a word boundary with an ellipsis, never mid-word."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if not text[limit - 1].isspace() and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "\u2026"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), shortened.

    Libraries' messages often run to many lines (server responses, C++ locations); a sentence for the
    user takes the first.
    """
    text = str(exc).strip()
    return shorten(text.splitlines()[0]) if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: first line of its message``, shortened: a cause fit for one sentence."""
    text = str(exc).strip()
    return shorten(f"{type(exc).__name__}: {text.splitlines()[0]}") if text else type(exc).__name__


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
