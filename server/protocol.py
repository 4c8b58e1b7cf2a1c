"""The OpenAI Images API: request, response and stream-event models, plus our documented extensions.

OpenAI fields keep their OpenAI meaning and their enums: a value outside one is a 400 naming the field, as
OpenAI answers. Unknown fields are ignored (OpenAI clients send newer fields), except those of a disabled
plugin, which the service refuses by name. Extensions are top-level fields; SDK users send them with
`extra_body`. Every list is bounded by what it describes.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

MAX_SEED = 2**63 - 1
MAX_IMAGES = 10  # n

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]
EditQuality = Literal["auto", "low", "medium", "high", "standard"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = Field(default=None, max_length=256)
    n: int | None = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, max_length=16)  # "auto" or WIDTHxHEIGHT, multiples of 16
    quality: Quality | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(default=None, max_length=512)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)

    # Extensions
    negative_prompt: str | None = Field(default=None, max_length=32000)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    true_cfg_scale: float | None = Field(default=None, ge=1, le=100)
    seed: int | list[int] | None = Field(default=None)

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, value):
        return "jpeg" if value == "jpg" else value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value):
        seeds = value if isinstance(value, list) else [value] if value is not None else []
        if len(seeds) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} seeds, one per image")
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        return value


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(default=None, max_length=20 * 2**20 * 4 // 3 + 64)
    file_id: str | None = Field(default=None, max_length=256)


class EditFields(BaseModel):
    quality: EditQuality | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    input_fidelity: Literal["high", "low"] | None = None
    images: list[ImageRef] | None = Field(default=None, min_length=1, max_length=16)  # JSON form only
    mask: ImageRef | None = None  # JSON form only


def request_models(plugin_fields: list[type[BaseModel]]) -> tuple[type[ImageRequest], type[ImageRequest]]:
    """The generation and edit request models, with the enabled plugins' fields mixed in."""
    bases = tuple(plugin_fields)
    generation = create_model("ImageGenerationRequest", __base__=(ImageRequest, *bases))
    edit = create_model("ImageEditRequest", __base__=(EditFields, ImageRequest, *bases))
    return generation, edit


# -- responses ----------------------------------------------------------------------


class ImageData(BaseModel):
    """One image. Plugins add their fields (`nsfw`, `upload`, `s3_url`, ...), as OpenAI clients ignore them."""

    model_config = ConfigDict(extra="allow")

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None


class InputTokensDetails(BaseModel):
    text_tokens: int = 0
    image_tokens: int = 0


class Usage(BaseModel):
    """OpenAI counts tokens for its GPT image models; a diffusion model has none to count."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    size: str
    quality: Literal["low", "medium", "high"]


class StreamEvent(BaseModel):
    """`image_generation.partial_image` / `.completed` and `image_edit.partial_image` / `.completed`."""

    model_config = ConfigDict(extra="allow")

    type: Literal[
        "image_generation.partial_image",
        "image_generation.completed",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    b64_json: str
    created_at: int
    size: str
    quality: Literal["low", "medium", "high"]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    partial_image_index: int | None = None  # partial images only
    usage: Usage | None = None  # completed events only


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- videos (/v1/videos) -----------------------------------------------------------


class VideoRequest(BaseModel):
    """POST /v1/videos. `seconds` and `size` are strings, as OpenAI's; the model's rules decide what fits.
    `input_reference` is a multipart file, or in JSON an image reference (a data URL or an allowed host's URL)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = Field(default=None, max_length=256)
    seconds: str | None = Field(default=None, max_length=16)
    size: str | None = Field(default=None, max_length=16)
    input_reference: ImageRef | None = None

    # Extensions
    negative_prompt: str | None = Field(default=None, max_length=32000)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class VideoRemixRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=32000)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """A video job, as OpenAI's `Video` object."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    error: VideoError | None = None
    prompt: str
    remixed_from_video_id: str | None = None
    seconds: str
    size: str


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
