"""The binary on an s3:// object store (the moto emulator that tests/run.sh
starts; skipped when SHOAL_TEST_S3_URL is not set)."""

from __future__ import annotations

import os
import urllib.parse

import pytest

from clients import kp_consume, kp_producer
from harness import unique_name

S3_URL = os.environ.get("SHOAL_TEST_S3_URL")

# In CI (CI=true) the harness always provides the emulator: never skip there.
pytestmark = pytest.mark.skipif(not S3_URL and not os.environ.get("CI"), reason="SHOAL_TEST_S3_URL not set (tests/run.sh sets it)")


def s3_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def test_produce_flush_restart_consume_on_s3(shoal_factory):
    url = urllib.parse.urlparse(S3_URL)
    prefix = f"{url.path.strip('/')}/e2e-{unique_name('run')}".strip("/")
    store = f"s3://{url.netloc}/{prefix}"
    shoal = shoal_factory(object_store=store)
    shoal.start()

    topic = unique_name("s3")
    values = [f"s3-record-{i}".encode() for i in range(50)]
    p = kp_producer(shoal.bootstrap, acks="all")
    try:
        for v in values:
            p.send(topic, value=v, partition=0)
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)

    doc = shoal.wait_flushed(topic, {0: len(values)})
    objects = {seg["object"] for sh in doc["shards"] for seg in sh["segments"]}
    assert objects, doc
    keys = s3_keys(url.netloc, prefix + "/")
    for obj in objects:
        assert any(k.endswith(obj) for k in keys), f"{obj} not in bucket under {prefix}/: {keys[:20]}"

    shoal.restart()
    recs = kp_consume(shoal.bootstrap, topic, len(values), partitions=[0])
    assert [r.value for r in recs] == values
