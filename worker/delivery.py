"""How finished images travel back: base64 data URIs, or uploads to the configured bucket.

As the official worker does: with ``BUCKET_ENDPOINT_URL`` set, images are uploaded and URLs returned
unless the request asks for ``return_type: "base64"``; without a bucket they come back as data URIs.
A request for ``"s3"`` without a bucket, a bucket without its keys, or a failed upload is an error:
never a silent fallback to base64 or to RunPod's local-folder stand-in.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

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


def upload(job_id: str, images: Sequence[EncodedImage], settings: Settings) -> list[str]:
    """Upload every image with RunPod's rp_upload; any failure is an :class:`UploadFailed`."""
    check_bucket(settings)
    from runpod.serverless.utils.rp_upload import upload_in_memory_object

    urls = []
    for k, image in enumerate(images):
        name = f"{job_id}-{k}-{uuid.uuid4().hex[:8]}.{image.extension}"
        try:
            url = upload_in_memory_object(name, image.data, prefix=job_id)
        except Exception as error:  # boto3/botocore raise many types; all mean the same to the caller
            raise UploadFailed(f"uploading image {k} to {settings.bucket_endpoint_url} failed: {error}") from None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UploadFailed(f"uploading image {k} returned {str(url)[:100]!r}, not a URL; check the bucket settings")
        urls.append(url)
    return urls


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
