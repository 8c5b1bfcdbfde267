"""The S3 blob store (BLOB_URL=s3://bucket/prefix) against a real S3-protocol
server: moto in server mode, over HTTP on loopback."""

from __future__ import annotations

import io
import os

import pytest

from db.blobstore import BlobNotFound, S3BlobStore, TooLarge, open_blob_store


def objects(store: S3BlobStore) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_blob_url_s3_opens_the_bucket_at_the_endpoint_from_the_environment(s3_bucket, s3_env):
    store = open_blob_store(f"s3://{s3_bucket}/hospital-a/blobs/")
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (s3_bucket, "hospital-a/blobs")
    assert store.client.meta.endpoint_url == s3_env
    store.put_bytes("k", b"v")
    assert objects(store) == ["hospital-a/blobs/k"], "keys live under the URL's prefix"


def test_round_trip_of_uploads_masks_and_deletes(s3_bucket):
    store = open_blob_store(f"s3://{s3_bucket}/bd")
    big = os.urandom(9 * 1024 * 1024 + 123)  # past boto3's 8 MiB multipart threshold and the memory spool
    key = "tenants/t/jobs/j/i1/source"
    assert store.put_stream(key, io.BytesIO(big), max_bytes=64 * 1024 * 1024) == len(big)
    store.put_bytes("tenants/t/jobs/j/i1/mask.png", b"\x89PNG mask")
    store.put_bytes("tenants/t/jobs/j2/i9/mask.png", b"other job")
    assert store.get_bytes(key) == big
    assert store.exists(key) and not store.exists("tenants/t/jobs/j/i1/overlay.png")

    store.put_bytes("tenants/t/jobs/j/i1/mask.png", b"rewritten")  # a chunk processed twice: one object
    assert store.get_bytes("tenants/t/jobs/j/i1/mask.png") == b"rewritten"

    store.delete_prefix("tenants/t/jobs/j")
    assert objects(store) == ["bd/tenants/t/jobs/j2/i9/mask.png"], "only the other job is left"
    with pytest.raises(BlobNotFound):
        store.get_bytes(key)


def test_upload_over_the_limit_is_refused_and_stores_nothing(s3_bucket):
    store = open_blob_store(f"s3://{s3_bucket}")
    with pytest.raises(TooLarge, match="limit of 1000 bytes"):
        store.put_stream("tenants/t/jobs/j/i/source", io.BytesIO(b"x" * 1001), max_bytes=1000)
    assert objects(store) == []
    assert store.put_stream("tenants/t/jobs/j/i/source", io.BytesIO(b"x" * 1000), max_bytes=1000) == 1000


def test_keys_that_climb_out_or_are_empty_are_rejected(s3_bucket):
    store = open_blob_store(f"s3://{s3_bucket}/bd")
    for bad in ("", "/abs", "a/../b", "a//b", "a/.."):
        with pytest.raises(ValueError, match="invalid blob key"):
            store.put_bytes(bad, b"x")
    assert objects(store) == []


def test_missing_bucket_and_unreachable_endpoint_are_clear_errors(s3_env):
    from botocore.exceptions import ClientError, EndpointConnectionError

    with pytest.raises(ValueError, match="needs a bucket"):
        open_blob_store("s3:///prefix-only")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        open_blob_store("s3://no-such-bucket-here/p").put_bytes("k", b"x")
    dead = open_blob_store("s3://b/p", endpoint_url="http://127.0.0.1:1")
    with pytest.raises(EndpointConnectionError):
        dead.get_bytes("k")
