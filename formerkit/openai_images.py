"""The OpenAI-compatible images endpoint of ``formerkit serve`` (added beside ``formerkit.openai_api``'s, whose
errors and field rules it shares).

- ``POST /v1/images/generations``: image generators (a ``dit-digits`` or ``maskgit-digits`` run), in OpenAI's images
  shape, so ``client.images.generate(model=NAME, prompt="3", n=4, extra_body={"seed": 1, "steps": 10})`` works.
  ``prompt`` is the class to draw: its name among the run's class names, else its id as text ("3"); or ``class``, the
  id as an integer (an extension; with both, they must agree). ``n`` images (1-64) of that class, drawn together from
  one generator seeded once with ``seed`` (default 0, as ``formerkit sample``): the same request gives the same
  PNGs (image i of a request with another n may differ). ``steps`` and ``guidance`` (extensions) default to the
  run's recipe.
  Each image is a PNG of the raw-unit image scaled by the data's maximum (``raw_max``, 16 for digits) to 0-255:
  ``round(255 * clamp(image / raw_max, 0, 1))``, grayscale for 1 channel, RGB for 3; ``scale`` (an extension, 1-32,
  default 1) enlarges it by nearest neighbour (an 8x8 digit is tiny), and ``size`` ("WxH") may ask for the same
  thing: the model's size times a whole factor ("64x64" from an 8x8 model is scale 8) or "auto"; any other size is
  refused, as the model draws one size. ``response_format`` is ``b64_json`` only (``url`` is refused: this server
  keeps no files to link to), ``output_format`` ``png`` only. The answer: ``{"created", "data": [{"b64_json",
  "revised_prompt": the class name}], "size", "output_format"}``. ``model`` may be left out (one model is served).
"""

import base64
import time

from formerkit.errors import InputError, ServeError
from formerkit.generation.grid import png_bytes
from formerkit.openai_api import check_model, refuse_field

__all__ = ["add_image_routes"]

# The most images one images request may ask for, sampler steps per image, and the largest nearest-neighbour scale.
MAX_IMAGES = 64
MAX_IMAGE_STEPS = 1000
MAX_IMAGE_SCALE = 32


def add_image_routes(app, service) -> None:
    """Adds ``POST /v1/images/generations`` over ``service`` (an image-generation run) to the FastAPI ``app``."""
    from pydantic import BaseModel, ConfigDict, Field

    class ImageRequest(BaseModel):
        # Unknown fields (quality, style, background, ...) are ignored, as in the other OpenAI endpoints.
        model_config = ConfigDict(extra="ignore", populate_by_name=True)
        model: str | None = None
        prompt: str | None = None
        class_id: int | None = Field(None, alias="class", strict=True)
        n: int | None = Field(None, ge=1, le=MAX_IMAGES, strict=True)
        seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
        steps: int | None = Field(None, ge=1, le=MAX_IMAGE_STEPS, strict=True)
        guidance: float | None = Field(None, strict=True)
        scale: int | None = Field(None, ge=1, le=MAX_IMAGE_SCALE, strict=True)
        size: str | None = None
        response_format: str | None = None
        output_format: str | None = None
        user: str | None = None

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest):
        check_model(service, service.model_id if body.model is None else body.model, "image_generation")
        if body.response_format not in (None, "b64_json"):
            raise refuse_field("response_format", f"only b64_json: this server keeps no images to link to, got "
                                                  f"{body.response_format!r}")
        if body.output_format not in (None, "png"):
            raise refuse_field("output_format", f"only png, got {body.output_format!r}")
        generator = service.image_generator
        label = _image_class(generator.classes, body.prompt, body.class_id)
        zoom = _image_scale(service.preprocessing["image_size"], body.size, body.scale)
        try:
            images = await service.generate_images([label] * (body.n or 1), steps=body.steps,
                                                   guidance=body.guidance, seed=0 if body.seed is None else body.seed)
        except InputError as error:  # the sampler refuses a value (a step count past a DDPM's diffusion steps, ...)
            param = str(error).split(":")[0]
            raise ServeError(400, str(error), param=param, code="invalid_value") from None
        data = [{"b64_json": base64.b64encode(png_bytes(image / generator.raw_max, zoom=zoom)).decode(),
                 "revised_prompt": generator.classes[label]} for image in images]
        height, width = images.shape[-2:]
        return {"created": int(time.time()), "data": data, "size": f"{width * zoom}x{height * zoom}",
                "output_format": "png"}


def _image_class(classes: list[str], prompt: str | None, class_id: int | None) -> int:
    """The class an images request asks for: ``prompt`` a class name (exactly, else ignoring case) or a class id as
    text, or ``class_id``; both given must agree. A 400 naming the field otherwise."""
    count = len(classes)
    shown = ", ".join(classes[:20]) + (", ..." if count > 20 else "")
    if class_id is not None and not 0 <= class_id < count:
        raise ServeError(400, f"class: a class id in [0, {count - 1}] ({shown}), got {class_id}", param="class",
                         code="invalid_value")
    if prompt is None:
        if class_id is None:
            raise ServeError(400, f"prompt: required: the class to draw, a name ({shown}) or an id in [0, "
                                  f"{count - 1}] (or send class, an integer id)", param="prompt",
                             code="invalid_value")
        return class_id
    text = prompt.strip()
    folded = [name.casefold() for name in classes]
    if text in classes:
        chosen = classes.index(text)
    elif text.casefold() in folded:
        chosen = folded.index(text.casefold())
    elif text.isdecimal() and int(text) < count:
        chosen = int(text)
    else:
        raise ServeError(400, f"prompt: this model draws a class: a name ({shown}) or an id in [0, {count - 1}], "
                              f"got {prompt!r}", param="prompt", code="invalid_value")
    if class_id is not None and class_id != chosen:
        raise ServeError(400, f"class: {class_id} and prompt {prompt!r} (class {chosen}, {classes[chosen]!r}) "
                              "disagree; send one of them", param="class", code="invalid_value")
    return chosen


def _image_scale(image_size, size: str | None, scale: int | None) -> int:
    """The nearest-neighbour factor of an images request: ``scale``, or the one ``size`` ("WxH") implies as a whole
    multiple of the model's (H, W) ``image_size``; both given must agree."""
    if size is None or size == "auto":
        return 1 if scale is None else scale
    height, width = image_size
    parts = size.lower().split("x")
    numbers = [int(part) for part in parts if part.isdecimal()]
    factor = numbers[0] // width if len(parts) == 2 and len(numbers) == 2 and numbers[0] % width == 0 else 0
    if factor < 1 or numbers != [width * factor, height * factor] or factor > MAX_IMAGE_SCALE:
        raise refuse_field("size", f"this model draws {width}x{height} images: send {width}x{height}, a whole "
                                   f"multiple of it up to x{MAX_IMAGE_SCALE} ({width * 8}x{height * 8}: scale 8) or "
                                   f"auto; got {size!r}")
    if scale is not None and scale != factor:
        raise refuse_field("size", f"{size!r} is scale {factor}, but scale is {scale}; send one of them")
    return factor
