"""How finished images travel back: base64 data URIs, or uploads to the configured bucket.

As the official worker does: with ``BUCKET_ENDPOINT_URL`` set, images are uploaded and URLs returned
unless the request asks for ``return_type: "base64"``; without a bucket they come back as data URIs.
A request for ``"s3"`` without a bucket, a bucket without its keys, or a failed upload is an error:
never a silent fallback to base64 or to RunPod's local-folder stand-in.

Uploads go where RunPod's ``rp_upload`` puts them (bucket ``%m-%y`` of the endpoint, key ``<job id>/<name>``, a
presigned URL valid for 7 days), with what it leaves out: the image's ``Content-Type`` (``image/png``, as the
official worker's ``upload_image`` sets; without it S3-compatible servers serve ``binary/octet-stream``), and a
deadline. Each image has ``UPLOAD_TIMEOUT_S`` for all its attempts together (botocore's standard retry mode
retries connection errors, throttling and 5xx :data:`UPLOAD_ATTEMPTS` times, each connect and read bounded by a
share of the deadline), and the job's images go up in parallel.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any

from core.errors import InvalidRequest, OutputTooLarge, UploadFailed
from core.results import EncodedImage
from core.settings import Settings


def check_bucket(settings: Settings) -> None:
    """The bucket settings are complete (RunPod's rp_upload would otherwise write to ./local_upload instead)."""
    missing = [
        name
        for name, value in (
            ("BUCKET_ACCESS_KEY_ID", settings.bucket_access_key_id),
            ("BUCKET_SECRET_ACCESS_KEY", settings.bucket_secret_access_key),
        )
        if not value
    ]
    if missing:
        raise UploadFailed(
            f"BUCKET_ENDPOINT_URL is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; "
            "set the bucket's keys on the endpoint, or unset BUCKET_ENDPOINT_URL to get base64 images"
        )


UPLOAD_ATTEMPTS = 3
PRESIGNED_URL_S = 7 * 24 * 3600  # as rp_upload


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint_url: str, key_id: str, secret: str, timeout_s: float) -> Any:
    """One boto3 client per bucket configuration (clients are thread-safe and cost ~0.1 s to make)."""
    import boto3
    from botocore.config import Config
    from runpod.serverless.utils.rp_upload import extract_region_from_url

    per_call_s = max(1.0, timeout_s / (2 * UPLOAD_ATTEMPTS))  # connect + read of every attempt fit the deadline
    config = Config(
        signature_version="s3v4",
        connect_timeout=per_call_s,
        read_timeout=per_call_s,
        retries={"max_attempts": UPLOAD_ATTEMPTS, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=extract_region_from_url(endpoint_url),
        config=config,
    )


def _put(client: Any, bucket: str, key: str, image: EncodedImage) -> str:
    client.put_object(Bucket=bucket, Key=key, Body=image.data, ContentType=image.mime_type)
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGNED_URL_S)


def upload(job_id: str, images: Sequence[EncodedImage], settings: Settings) -> list[str]:
    """Upload every image with its content type; any failure or a missed deadline is an :class:`UploadFailed`."""
    check_bucket(settings)
    deadline = time.monotonic() + settings.upload_timeout_s  # client set-up included: the whole upload is bounded
    endpoint = str(settings.bucket_endpoint_url)
    client = _s3_client(
        endpoint, str(settings.bucket_access_key_id), str(settings.bucket_secret_access_key), settings.upload_timeout_s
    )
    bucket = time.strftime("%m-%y")  # rp_upload's bucket, so existing clients find images where they did
    keys = [f"{job_id}/{job_id}-{k}-{uuid.uuid4().hex[:8]}.{image.extension}" for k, image in enumerate(images)]
    # Not a `with` block: leaving it waits for every upload, and a hung one must not hold the job past its deadline.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(images)), thread_name_prefix="upload")
    try:
        futures = [pool.submit(_put, client, bucket, key, image) for key, image in zip(keys, images, strict=True)]
        urls = []
        for k, future in enumerate(futures):
            try:
                url = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise UploadFailed(
                    f"uploading image {k} to {endpoint} did not finish within UPLOAD_TIMEOUT_S="
                    f"{settings.upload_timeout_s:g} s ({UPLOAD_ATTEMPTS} attempts); check that the bucket answers, "
                    "or raise UPLOAD_TIMEOUT_S"
                ) from None
            except Exception as error:  # boto3/botocore raise many types; all mean the same to the caller
                raise UploadFailed(
                    f"uploading image {k} to {endpoint} failed (after up to {UPLOAD_ATTEMPTS} attempts for "
                    f"connection errors, throttling and server errors): {error}"
                ) from None
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise UploadFailed(
                    f"uploading image {k} returned {str(url)[:100]!r}, not a URL; check the bucket settings"
                )
            urls.append(url)
        return urls
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def deliver(
    job_id: str, images: Sequence[EncodedImage], return_type: str | None, settings: Settings
) -> tuple[list[str], str]:
    """The ``images`` list of the output and how they travelled (``"base64"`` or ``"s3"``)."""
    wanted = return_type or ("s3" if settings.bucket_configured else "base64")
    if wanted == "s3":
        if not settings.bucket_configured:
            raise InvalidRequest(
                "return_type: 's3' needs BUCKET_ENDPOINT_URL (and bucket keys) set on the worker; "
                "leave return_type out to get base64 images"
            )
        return upload(job_id, images, settings), "s3"
    size = sum(image.data_uri_length for image in images)
    if size > settings.max_payload_bytes:
        if settings.bucket_configured:  # asked for base64 explicitly, but it cannot travel: say so, do not upload
            hint = "leave return_type out (or send 's3') to have them uploaded to the configured bucket"
        else:
            hint = "set BUCKET_ENDPOINT_URL so images are uploaded"
        formats = "" if images[0].format != "png" else "output_format 'jpeg' or 'webp', "
        raise OutputTooLarge(
            f"the {len(images)} image(s) take {size / 1e6:.1f} MB as base64, over this worker's "
            f"{settings.max_payload_bytes / 1e6:.0f} MB payload limit (MAX_PAYLOAD_BYTES); ask for {formats}"
            f"a lower quality, fewer or smaller images, or {hint}"
        )
    return [image.data_uri() for image in images], "base64"
