"""Storage faults through a real TCP proxy in front of the moto S3 server: outages are retried, the
errors left after the retry budget are classified retryable, permanent ones are not retried."""

from __future__ import annotations

import concurrent.futures
import errno
import pickle
import socket
import time
import uuid
from typing import Any

import pytest
from faultproxy import FaultProxy

from evf.io import ImageDecodeError, ImageReadError, ImageWriteError, load_image, read_bytes, write_bytes
from evf.request import InvalidRequestError, parse_request
from evf.retry import RetryPolicy, call_with_retry, is_retryable

# Waits of at least 0.5 + 1 + 2 + 4 + 8 + 8 + 8 = 31.5 s: a 10 s outage is always ridden out.
PATIENT = RetryPolicy(attempts=8, first_wait_s=0.5, max_wait_s=8.0, jitter_s=0.5)
# Gives up within a few seconds.
HASTY = RetryPolicy(attempts=2, first_wait_s=0.2, max_wait_s=0.5, jitter_s=0.1, request_attempts=1)


@pytest.fixture
def proxied(s3_server: Any, s3_bucket: tuple[str, dict[str, Any]]) -> Any:
    """(proxy, bucket, storage options that reach the bucket through the proxy)."""
    bucket, _ = s3_bucket
    with FaultProxy(s3_server.endpoint_url, lifetime_s=120) as proxy:
        options = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.url}}
        yield proxy, bucket, options


def test_a_ten_second_refusal_is_ridden_out_by_reads_and_writes(proxied, s3_server) -> None:
    proxy, bucket, options = proxied
    payload = uuid.uuid4().bytes * 1000
    write_bytes(f"s3://{bucket}/in.bin", payload, options)  # through the proxy, while it passes
    proxy.set_mode("refuse", for_s=10)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        read = pool.submit(read_bytes, f"s3://{bucket}/in.bin", options, PATIENT)
        written = pool.submit(write_bytes, f"s3://{bucket}/out.bin", payload[::-1], options, PATIENT)
        assert read.result(timeout=120) == payload
        written.result(timeout=120)
    # Both calls could only finish once the outage was over.
    assert time.monotonic() - started >= 9.5
    stored = s3_server.client().get_object(Bucket=bucket, Key="out.bin")["Body"].read()
    assert stored == payload[::-1]


@pytest.mark.parametrize("mode", ["reset", "http_503", "delay"])
def test_resets_throttling_and_delays_for_a_while_are_ridden_out(proxied, mode: str) -> None:
    proxy, bucket, options = proxied
    write_bytes(f"s3://{bucket}/in.bin", b"payload", options)
    proxy.set_mode(mode, for_s=4, delay_s=1.0)
    assert read_bytes(f"s3://{bucket}/in.bin", options, PATIENT) == b"payload"
    write_bytes(f"s3://{bucket}/out.bin", b"written", options, PATIENT)
    assert proxy.counts[mode] > 0  # the fault was met, not slipped past
    proxy.set_mode("pass")
    assert read_bytes(f"s3://{bucket}/out.bin", options) == b"written"


@pytest.mark.parametrize("mode", ["refuse", "reset", "http_503"])
def test_a_longer_outage_ends_in_a_retryable_error(proxied, mode: str) -> None:
    proxy, bucket, options = proxied
    write_bytes(f"s3://{bucket}/in.bin", b"payload", options)
    proxy.set_mode(mode)
    with pytest.raises(ImageReadError) as read_error:
        read_bytes(f"s3://{bucket}/in.bin", options, HASTY)
    with pytest.raises(ImageWriteError) as write_error:
        write_bytes(f"s3://{bucket}/out.bin", b"x", options, HASTY)
    for error in (read_error.value, write_error.value):
        assert is_retryable(error), error
        assert is_retryable(pickle.loads(pickle.dumps(error)))  # as a Ray task's error arrives
        assert "gave up after 2 attempts" in str(error)
    proxy.set_mode("pass")  # the next run gets through
    assert read_bytes(f"s3://{bucket}/in.bin", options, HASTY) == b"payload"


def test_missing_objects_and_buckets_are_permanent_and_not_retried(proxied) -> None:
    proxy, bucket, options = proxied
    slow = RetryPolicy(attempts=3, first_wait_s=30.0)  # a single retry would take 30 s
    started = time.monotonic()
    for uri in (f"s3://{bucket}/no-such-key.png", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.png"):
        with pytest.raises(ImageReadError) as info:
            read_bytes(uri, options, slow)
        assert not is_retryable(info.value), info.value
        assert not is_retryable(pickle.loads(pickle.dumps(info.value)))
        assert "gave up" not in str(info.value)
    assert time.monotonic() - started < 20


def test_not_an_image_and_invalid_requests_are_permanent(proxied) -> None:
    _, bucket, options = proxied
    write_bytes(f"s3://{bucket}/page.jpg", b"<html>not an image</html>", options)
    with pytest.raises(ImageDecodeError) as info:
        load_image(f"s3://{bucket}/page.jpg", options)
    assert not is_retryable(info.value)
    with pytest.raises(InvalidRequestError) as invalid:
        parse_request({"image_url": f"s3://{bucket}/page.jpg", "prompt": "car", "no_such_option": 1})
    assert not is_retryable(invalid.value)


def test_a_full_disk_is_permanent(tmp_path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert not is_retryable(full)
    assert is_retryable(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))


def test_call_with_retry_stops_at_the_budget_and_counts_attempts() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        return "ok"

    policy = RetryPolicy(attempts=3, first_wait_s=0.1, max_wait_s=0.2, jitter_s=0.0)
    assert call_with_retry(policy, flaky) == "ok"
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.1 + 0.2 - 0.01
    calls.clear()
    with pytest.raises(ConnectionRefusedError) as info:
        call_with_retry(RetryPolicy(attempts=2, first_wait_s=0.0, jitter_s=0.0), flaky)
    assert len(calls) == 2 and info.value.retry_attempts == 2


def test_retry_policy_bounds() -> None:
    policy = RetryPolicy()
    assert policy.min_total_wait_s == 0.5 + 1 + 2 + 4 + 8 + 16 + 20
    assert policy.max_total_wait_s == policy.min_total_wait_s + 7 * policy.jitter_s
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_the_proxy_stops_by_itself(s3_server) -> None:
    with FaultProxy(s3_server.endpoint_url, lifetime_s=1.0) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5):
            pass
        time.sleep(1.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
