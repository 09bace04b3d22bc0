"""The IP-Adapter field group: ``ip_adapters``, a list of image prompts, each an IP-Adapter file, a reference image
and how strongly it steers.

Names follow diffusers (``load_ip_adapter``'s weight file, ``ip_adapter_image``, ``set_ip_adapter_scale``) and the
list shape of this worker's ``loras`` and ``controlnets``: ``[{"name", "image", "scale"}]``. sd-webui-controlnet
(A1111's API) sends an IP-Adapter as a ControlNet unit (``module: "ip-adapter_clip_sdxl"``, ``model``, ``weight``,
``input_image``) and ComfyUI's IPAdapter nodes call the scale ``weight``; their bounds are taken: 0..2, default 1.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.request.fields import GROUP, MAX_IMAGE_URL_CHARS, REQUEST_CONFIG, check_image_reference, number_from_int

MAX_IP_ADAPTERS = 4
WEIGHT_SUFFIX = ".safetensors"
SINGULAR = "ip_adapter"  # the one-adapter spelling, read as ip_adapters


class IpAdapterUnit(BaseModel):
    """One image prompt of a job: which IP-Adapter, its reference image, and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[
        str,
        Field(min_length=1, max_length=255, description="an IP-Adapter .safetensors under IP_ADAPTER_DIR"),
    ]
    image: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_IMAGE_URL_CHARS,
            description="the reference image: http(s) URL, data URI or bare base64",
        ),
    ]
    scale: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0

    _floats_from_ints = field_validator("scale", mode="before")(number_from_int)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith(".") or "\x00" in value:
            raise ValueError(
                "the file name of an IP-Adapter under IP_ADAPTER_DIR or its sdxl_models/ folder, e.g. "
                "'ip-adapter-plus_sdxl_vit-h' (no path separators, not starting with '.')"
            )
        return value.removesuffix(WEIGHT_SUFFIX)

    @field_validator("image")
    @classmethod
    def _image_kind(cls, value: str) -> str:
        check_image_reference(value)
        return value


class IpAdapterFields(BaseModel):
    """The request's image prompts (several at once: each adds its own attention to the text's, as diffusers runs a
    list of IP-Adapters)."""

    model_config = REQUEST_CONFIG

    ip_adapters: Annotated[
        list[IpAdapterUnit],
        GROUP,
        Field(
            max_length=MAX_IP_ADAPTERS,
            description='[{"name": IP-Adapter file under IP_ADAPTER_DIR (e.g. "ip-adapter-plus_sdxl_vit-h"), '
            '"image": URL/data URI/base64, "scale": 0..2 (1)}]; one object (or ip_adapter) is a list of one',
        ),
    ] = []

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, data: Any) -> Any:
        """One adapter may come as an object, and as ``ip_adapter`` (diffusers' pipelines take one image prompt as
        ``ip_adapter_image``, not a list): the same as a list of one."""
        if not isinstance(data, dict):
            return data
        if SINGULAR in data:
            if "ip_adapters" in data:
                raise ValueError("ip_adapter: give ip_adapter or ip_adapters, not both (ip_adapters takes a list)")
            data = {**{key: value for key, value in data.items() if key != SINGULAR}, "ip_adapters": data[SINGULAR]}
        if isinstance(data.get("ip_adapters"), dict):
            data = {**data, "ip_adapters": [data["ip_adapters"]]}
        return data
