"""Telling one object's failure from the object store's: what becomes a file's error row and what stops a job.

A file the store does not have (or will not give out, while the store still answers) is that file's problem: it gets
an error row and the job goes on. The store itself failing (unreachable, throttling, server errors, keys it refuses)
is no file's problem: every later read would fail alike, so the job stops with ``StoreUnavailable`` (transient codes
are first retried by Ray Data), and a rerun reads those files instead of skipping them as scored.

PyArrow's S3 errors are ``OSError``s whose text carries ``AWS Error <CODE>``; an exception raised in a Ray task
reaches the driver without its ``__cause__`` chain, as text holding the worker's traceback, so the text is read.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

ERROR_PREFIX = "S3 error"
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+(?: \(HTTP status \d+\))?|\[code \d+\])")
# PyArrow names only some of the AWS SDK's error codes and prints the others as numbers.
_NUMBERED = {"[code 19]": "SLOW_DOWN", "[code 24]": "REQUEST_TIMEOUT"}
_SERVER_ERROR = r"UNKNOWN \(HTTP status 5\d\d\)"
# Worth retrying: the store restarting, throttling or briefly failing.
_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE",
              "INTERNAL_FAILURE")
# The store as a whole failing: every other request would fail the same way. Any other S3 error may concern one
# object (its policy, its encryption key, its storage class) or the keys themselves (an expired token): asking the
# store about the bucket tells which.
_STORE_WIDE = re.compile(
    rf"({'|'.join(_TRANSIENT)}|SIGNATURE_DOES_NOT_MATCH|INVALID_ACCESS_KEY_ID|{_SERVER_ERROR}|\[code \d+\])")
# What a person should check, for the codes seen most.
_HINTS = {
    "ACCESS_DENIED": "the store refused these credentials or their permissions; check the access key and secret",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key is wrong for this access key",
    "INVALID_ACCESS_KEY_ID": "the store does not know this access key",
    "NETWORK_CONNECTION": "cannot connect; check the endpoint and that the store is up",
    "SLOW_DOWN": "the store is throttling requests; retry later or with fewer workers",
    "NO_SUCH_BUCKET": "there is no such bucket; check the URI",
    "NO_SUCH_KEY": "there is no such object",
}


class StoreUnavailable(OSError):
    """The object store refused a request or could not be reached (credentials, network, server), so no single file
    is at fault: a job stops with this instead of writing error rows for files it never saw."""


class AwsError(NamedTuple):
    code: str  # e.g. "ACCESS_DENIED", "UNKNOWN (HTTP status 503)"
    context: str  # e.g. "When reading information for key 'x' in bucket 'b'"


def aws_error(err: Optional[BaseException]) -> Optional[AwsError]:
    """The S3 error in ``err`` or in what it was raised from (Ray task errors included); None when there is none
    (a missing object is a ``FileNotFoundError``, not an S3 error)."""
    for exc in _cause_chain(err):
        if isinstance(exc, FileNotFoundError):
            return None
        for line in str(exc).splitlines():
            if match := _AWS_ERROR.search(line):
                context = line[: match.start()].rstrip(": ").strip().split(": ")[-1]
                return AwsError(_NUMBERED.get(match.group(1), match.group(1)), context)
    return None


def is_store_wide(error: AwsError) -> bool:
    return _STORE_WIDE.fullmatch(error.code) is not None


def store_failure(err: Optional[BaseException]) -> Optional[str]:
    """One line for a person when ``err`` is a ``StoreUnavailable`` (here or in a Ray task) or an S3 error; None
    for anything else, which keeps its own message and traceback."""
    for exc in _cause_chain(err):
        if isinstance(exc, StoreUnavailable):
            return _message(exc)
        if raised_remotely := re.search(r"StoreUnavailable: (.+)", str(exc)):
            return raised_remotely.group(1).strip()
    found = aws_error(err)
    return None if found is None else describe(found)


def describe(error: AwsError) -> str:
    hint = _HINTS.get(error.code, "the store failed the request")
    where = error.context[:1].lower() + error.context[1:]
    return f"{ERROR_PREFIX} {error.code}: {hint} ({where})"


def transient_error_patterns() -> list[str]:
    """Ray Data ``retried_map_errors`` patterns (substrings, else regular expressions) matching the
    ``StoreUnavailable`` messages worth retrying."""
    return [f"{ERROR_PREFIX} {code}" for code in _TRANSIENT] + [f"{ERROR_PREFIX} {_SERVER_ERROR}"]


def _cause_chain(err: Optional[BaseException]):
    """``err`` and what it was explicitly raised from (``__cause__``, or a Ray task error's ``cause``); not the
    exceptions that were merely being handled (``__context__``), which would blame the store for a later bug."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "cause", None) or err.__cause__


def _message(err: BaseException) -> str:
    # A Ray task error that is also a StoreUnavailable prints its whole traceback; its first argument is the cause.
    if err.args and isinstance(err.args[0], BaseException):
        return _message(err.args[0])
    return str(err.args[0]) if err.args and isinstance(err.args[0], str) else str(err)
