"""The OpenAI Images API request schemas, plus our documented extensions.

OpenAI fields keep their OpenAI meaning. Unknown fields are ignored (OpenAI
clients send newer fields), except those of a disabled plugin, which the API
refuses by name. Extensions are top-level fields; SDK users send them with
`extra_body`.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

MAX_SEED = 2**63 - 1


class ImageRequest(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int | None = Field(default=1, ge=1, le=10)
    size: str | None = None
    quality: str | None = Field(default=None, max_length=32)  # echoed; steps come from num_inference_steps
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)

    # Extensions
    negative_prompt: str | None = Field(default=None, max_length=32000)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    true_cfg_scale: float | None = Field(default=None, ge=1, le=100)
    seed: int | list[int] | None = None

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, value):
        return "jpeg" if value == "jpg" else value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value):
        seeds = value if isinstance(value, list) else [value] if value is not None else []
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        return value


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(default=None, max_length=20 * 2**20 * 4 // 3 + 64)
    file_id: str | None = None


class EditFields(BaseModel):
    strength: float | None = Field(default=None, gt=0, le=1)
    input_fidelity: Literal["high", "low"] | None = None
    images: list[ImageRef] | None = Field(default=None, min_length=1, max_length=16)  # JSON form only
    mask: ImageRef | None = None  # JSON form only


def request_models(plugin_fields: list[type[BaseModel]]) -> tuple[type[ImageRequest], type[ImageRequest]]:
    """The generation and edit request models, with the enabled plugins' fields mixed in."""
    bases = tuple(plugin_fields)
    generation = create_model("ImageGenerationRequest", __base__=(ImageRequest, *bases))
    edit = create_model("ImageEditRequest", __base__=(ImageRequest, EditFields, *bases))
    return generation, edit
