"""The OpenAI Images API: request, response and stream-event models, plus our documented extensions.

OpenAI fields keep their OpenAI meaning and their enums: a value outside one is a 400 naming the field, as
OpenAI answers. Unknown fields are ignored (OpenAI clients send newer fields), except those of a disabled
plugin, which the service refuses by name. Extensions are top-level fields; SDK users send them with
`extra_body`. Every list is bounded by what it describes.

Requests are validated strictly (`strict=True`), the plugins' fields too: `true` or `"2"` where an integer
belongs is a 400, as OpenAI answers. A multipart form is text, so `form_payload` first converts each field
once by its declared type (JSON text for numbers, booleans, lists and objects); then the same strict rules
apply to both.
"""

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

from server.bodies import IMAGE_URL_CHARS, MAX_TEXT, parse_json_value
from server.config import MAX_IMAGES
from server.errors import ErrorEvent

MAX_SEED = 2**63 - 1
MAX_INPUT_IMAGES = 16  # an edit's input images

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]
EditQuality = Literal["auto", "low", "medium", "high", "standard"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
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
    user: str = Field(default=None, max_length=512)  # no null, as OpenAI's spec says (absent: None)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)

    # Extensions
    negative_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
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

    image_url: str | None = Field(default=None, max_length=IMAGE_URL_CHARS)
    file_id: str | None = Field(default=None, max_length=256)


class EditFields(BaseModel):
    quality: EditQuality | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    input_fidelity: Literal["high", "low"] | None = None
    # JSON form only; no null, as OpenAI's spec says (absent: None)
    images: list[ImageRef] = Field(default=None, min_length=1, max_length=MAX_INPUT_IMAGES)
    mask: ImageRef = Field(default=None)


def request_models(plugin_fields: list[type[BaseModel]]) -> tuple[type[ImageRequest], type[ImageRequest]]:
    """The generation and edit request models, with the enabled plugins' fields mixed in."""
    bases = tuple(plugin_fields)
    generation = create_model("ImageGenerationRequest", __base__=(ImageRequest, *bases))
    edit = create_model("ImageEditRequest", __base__=(EditFields, ImageRequest, *bases))
    return generation, edit


_REF = "#/components/schemas/{model}"
EDIT_FORM = "ImageEditForm"
VIDEO_FORM = "VideoForm"


def openapi_bodies(generation: type[BaseModel], edit: type[BaseModel]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The request bodies of the routes that read the raw request (bounded parsing), by path, for /openapi.json,
    and the component schemas they and `STREAM_EVENTS` refer to: FastAPI cannot see these on its own."""
    models = [(m, "validation") for m in (generation, edit, VideoRequest, VideoRemixRequest)]
    models += [(m, "serialization") for m in (StreamEvent, ErrorEvent)]
    _, schemas = models_json_schema(models, ref_template=_REF)
    components = schemas["$defs"]
    binary = {"type": "string", "format": "binary"}
    image_files = {"image": {"anyOf": [binary, {"type": "array", "items": binary, "maxItems": MAX_INPUT_IMAGES}]}}
    components[EDIT_FORM] = _form(components[edit.__name__], EDIT_FORM, {**image_files, "mask": binary}, "image")
    components[VIDEO_FORM] = _form(components["VideoRequest"], VIDEO_FORM, {"input_reference": binary})
    bodies = {
        "/v1/images/generations": _body({"application/json": generation.__name__}),
        "/v1/images/edits": _body({"multipart/form-data": EDIT_FORM, "application/json": edit.__name__}),
        "/v1/videos": _body({"multipart/form-data": VIDEO_FORM, "application/json": "VideoRequest"}),
        "/v1/videos/{video_id}/remix": _body({"application/json": "VideoRemixRequest"}),
    }
    return bodies, components


def _body(contents: dict[str, str]) -> dict:
    content = {media: {"schema": {"$ref": _REF.format(model=name)}} for media, name in contents.items()}
    return {"requestBody": {"required": True, "content": content}}


def _form(json_model: dict, title: str, files: dict[str, dict], required_file: str | None = None) -> dict:
    """The multipart form of a JSON model: its fields as text converted by their type (`form_payload`), with
    `files` in place of the JSON form's image references (an edit's `images` and `mask`, a video's
    `input_reference`)."""
    replaced = {"images", "mask", "input_reference"}
    properties = {name: value for name, value in json_model["properties"].items() if name not in replaced}
    required = [name for name in json_model.get("required", []) if name not in replaced]
    required = [required_file, *required] if required_file else required
    return {**json_model, "title": title, "properties": {**files, **properties}, "required": required}


def field_keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Every key a model's fields may be sent under: their names and validation aliases."""
    keys = {}
    for name, info in model.model_fields.items():
        keys[name] = info
        alias = info.validation_alias
        choices = [alias] if isinstance(alias, str) else alias.choices if alias is not None else []
        keys.update({choice: info for choice in choices if isinstance(choice, str)})
    return keys


def form_payload(model: type[BaseModel], fields: dict) -> dict:
    """A multipart form's fields (text, and lists and objects of text from `a[]` and `a[k]` keys) as the JSON
    they stand for, converted by each field's declared type: free text stays text; for any other field ""
    and "null" are null, an enum takes its text, and numbers, booleans, lists and objects are read as JSON.
    Unknown fields stay as sent."""
    known = field_keys(model)
    return {key: _typed(known[key].annotation if key in known else None, value) for key, value in fields.items()}


def _typed(annotation: Any, value: Any) -> Any:
    if annotation is None:
        return value
    if isinstance(value, list):
        return [_typed(_list_item(annotation), item) for item in value]
    if isinstance(value, dict):
        model = _model(annotation)
        return form_payload(model, value) if model is not None else value
    if not isinstance(value, str) or _free_text(annotation):
        return value
    if value in ("", "null"):
        return None  # a form's null: the SDK sends None as an empty field, JSON-minded clients as null
    if _enum_text(annotation):
        return value
    try:
        return parse_json_value(value)
    except ValueError:
        return value  # not JSON: left as text, which strict validation refuses, naming the field


def _members(annotation: Any) -> tuple:
    """The types a field admits: a union's members, Annotated and Optional unwrapped."""
    if typing.get_origin(annotation) is Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return tuple(m for arg in typing.get_args(annotation) for m in _members(arg))
    return (annotation,)


def _free_text(annotation: Any) -> bool:
    return str in _members(annotation)


def _enum_text(annotation: Any) -> bool:
    literals = [m for m in _members(annotation) if typing.get_origin(m) is Literal]
    return any(isinstance(v, str) for m in literals for v in typing.get_args(m))


def _list_item(annotation: Any) -> Any:
    return next((typing.get_args(m)[0] for m in _members(annotation) if typing.get_origin(m) is list), None)


def _model(annotation: Any) -> type[BaseModel] | None:
    return next((m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)), None)


# -- responses ----------------------------------------------------------------------


class ImageData(BaseModel):
    """One image. Plugins add their fields (`nsfw`, `upload`, `s3_url`, ...), as OpenAI clients ignore them."""

    model_config = ConfigDict(extra="allow")

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None


class TokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage, counted as the model works: an image is one token per 16x16-pixel patch, the sequence a
    diffusion transformer (FLUX, SD3, Qwen-Image) runs on (`rules.image_tokens`). Output: every image
    generated. Input: an edit's image, at the size it is generated. Text tokens are 0: prompts are not
    tokenized by the server (each model has its own encoders, and FLUX pads every prompt to one length)."""

    # no defaults here: responses are written with `exclude_unset`, which would leave defaults out
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: TokensDetails
    output_tokens_details: TokensDetails

    @classmethod
    def of_images(cls, input_tokens: int, output_tokens: int) -> "Usage":
        return cls(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            input_tokens_details=TokensDetails(text_tokens=0, image_tokens=input_tokens),
            output_tokens_details=TokensDetails(text_tokens=0, image_tokens=output_tokens),
        )


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]  # no default: `exclude_unset` would leave it out
    output_format: OutputFormat
    size: str
    quality: Literal["low", "medium", "high"]
    usage: Usage


class StreamEvent(BaseModel):
    """`image_generation.partial_image` / `.completed` and `image_edit.partial_image` / `.completed` (an error
    after the stream began is `errors.ErrorEvent`)."""

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


# The events of a stream in /openapi.json (their schemas are components: see `openapi_bodies`)
STREAM_EVENTS = {"oneOf": [{"$ref": _REF.format(model=m.__name__)} for m in (StreamEvent, ErrorEvent)]}


# -- videos (/v1/videos) -----------------------------------------------------------


class VideoRequest(BaseModel):
    """POST /v1/videos. `seconds` and `size` are strings, as OpenAI's; the model's rules decide what fits.
    `input_reference` is a multipart file, or in JSON an image reference (a data URL or an allowed host's URL)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    model: str | None = Field(default=None, max_length=256)
    seconds: str | None = Field(default=None, max_length=16)
    size: str | None = Field(default=None, max_length=16)
    input_reference: ImageRef | None = None

    # Extensions
    negative_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class VideoRemixRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


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
