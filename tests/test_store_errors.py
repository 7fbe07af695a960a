"""pipelines/store_errors.py: which S3 failures become a file's error row and which stop a job, and how they read."""

from __future__ import annotations

import pytest

from pipelines.store_errors import (
    StoreUnavailable,
    aws_error,
    describe,
    is_store_wide,
    store_failure,
    transient_error_patterns,
)

# Messages as PyArrow's S3 client words them.
REFUSED_KEYS = ("When initiating multiple part upload for key 'b.bin' in bucket 'bkt': AWS Error "
                "SIGNATURE_DOES_NOT_MATCH during CreateMultipartUpload operation: The request signature we calculated "
                "does not match the signature you provided. (Request ID: 18ED02E8E36BA6C2)")
DENIED = ("When reading information for key 'a.bin' in bucket 'bkt': AWS Error ACCESS_DENIED during HeadObject "
          "operation: No response body.")
DOWN = ("When reading information for key 'in/0000.png' in bucket 'crawl': AWS Error NETWORK_CONNECTION during "
        "HeadObject operation: curlCode: 7, Could not connect to server")
BAD_GATEWAY = ("When listing objects under key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 502) during "
               "ListObjectsV2")
ARCHIVED = ("When reading information for key 'old.png' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) during "
            "GetObject operation")


THROTTLED = ("When reading information for key 'a.png' in bucket 'b': AWS Error [code 19] during HeadObject "
             "operation: No response body.")  # PyArrow prints the SDK codes it has no name for as numbers


@pytest.mark.parametrize(("message", "code", "store_wide"), [
    (REFUSED_KEYS, "SIGNATURE_DOES_NOT_MATCH", True),
    (DOWN, "NETWORK_CONNECTION", True),
    (BAD_GATEWAY, "UNKNOWN (HTTP status 502)", True),
    (THROTTLED, "SLOW_DOWN", True),
    (DENIED, "ACCESS_DENIED", False),  # the keys or one object's policy: the reader asks the store about the bucket
    (ARCHIVED, "UNKNOWN (HTTP status 403)", False),
])
def test_store_wide_failures_are_told_from_what_may_concern_one_object(message, code, store_wide):
    found = aws_error(OSError(message))
    assert found is not None and found.code == code
    assert is_store_wide(found) == store_wide


def test_a_missing_object_is_no_store_failure():
    assert aws_error(FileNotFoundError("[Errno 2] Path does not exist 'bkt/nope.bin'")) is None
    assert store_failure(FileNotFoundError("nope")) is None


def test_the_line_names_code_hint_and_object():
    assert store_failure(OSError(REFUSED_KEYS)) == (
        "S3 error SIGNATURE_DOES_NOT_MATCH: the secret key is wrong for this access key (when initiating multiple "
        "part upload for key 'b.bin' in bucket 'bkt')")


def test_an_error_raised_from_a_store_error_is_one_but_a_bug_while_handling_one_is_not():
    try:
        try:
            raise OSError(DOWN)
        except OSError as err:
            raise RuntimeError("writing the part failed") from err
    except RuntimeError as wrapped:
        assert store_failure(wrapped).startswith("S3 error NETWORK_CONNECTION")
    try:
        try:
            raise OSError(DOWN)
        except OSError:
            {}["missing"]  # a bug in the handler keeps its own traceback
    except KeyError as bug:
        assert store_failure(bug) is None


def test_a_store_failure_raised_in_a_ray_task_is_read_from_its_traceback_text():
    line = describe(aws_error(OSError(DOWN)))
    remote = RuntimeError("ray::MapBatches(decode_batch_arrow)()\n  File ...\n"
                          f"pipelines.store_errors.StoreUnavailable: {line}\n\nThe above exception was the direct "
                          "cause of the following exception:\nray.exceptions.UserCodeException: UDF failed")
    assert store_failure(remote) == line
    assert store_failure(StoreUnavailable(line)) == line


def test_a_store_failure_from_a_plain_ray_task_is_one_line():
    from ray.exceptions import RayTaskError

    line = describe(aws_error(OSError(DOWN)))
    raised = RayTaskError("read", "Traceback (most recent call last):\n  ...", StoreUnavailable(line))
    assert store_failure(raised.as_instanceof_cause()) == line


@pytest.mark.parametrize(("message", "retried"), [(DOWN, True), (BAD_GATEWAY, True), (THROTTLED, True),
                                                 (REFUSED_KEYS, False), (DENIED, False)])
def test_ray_data_retries_transient_store_failures_only(message, retried):
    from ray._common.retry import format_exception, matches_error  # what retried_map_errors is matched with
    from ray.exceptions import UserCodeException

    try:
        try:
            raise StoreUnavailable(describe(aws_error(OSError(message))))
        except StoreUnavailable as err:
            raise UserCodeException("UDF failed to process a data block.") from err
    except UserCodeException as wrapped:
        text = format_exception(wrapped, include_cause=True)
    assert any(matches_error(pattern, text) for pattern in transient_error_patterns()) == retried


@pytest.mark.timeout(120)
def test_init_ray_makes_ray_data_retry_them(ray_local):
    from ray.data import DataContext

    from pipelines.runtime import STORE_RETRIES

    context = DataContext.get_current()
    assert context.retried_map_errors == transient_error_patterns()
    assert context.max_map_retries == STORE_RETRIES
