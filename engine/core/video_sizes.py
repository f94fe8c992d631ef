"""OpenAI's video sizes and the catalog's resolutions: the Videos API takes and answers ``size`` as
"WIDTHxHEIGHT" (``720x1280``, ``1280x720``, ``1024x1792``, ``1792x1024``; the ``openai`` SDK's ``VideoSize``, and
https://developers.openai.com/api/docs/guides/video-generation), while the catalog prices a video per second by
its resolution, named by its short side ("720p", "1024p"). One mapping, for the emulator and the provider."""

from __future__ import annotations

__all__ = ["OPENAI_VIDEO_SIZES", "resolution_of", "size_of"]

# Per resolution, its sizes; the first is OpenAI's default orientation (portrait: a create with no size is 720x1280).
OPENAI_VIDEO_SIZES: dict[str, tuple[str, ...]] = {"720p": ("720x1280", "1280x720"),
                                                  "1024p": ("1024x1792", "1792x1024")}


def resolution_of(size: object) -> str | None:
    """The catalog's resolution of an OpenAI video ``size``; None for a size OpenAI does not offer."""
    return next((res for res, sizes in OPENAI_VIDEO_SIZES.items() if size in sizes), None)


def size_of(resolution: str) -> str | None:
    """The size a request of ``resolution`` is sent at when its body names none (OpenAI's default orientation)."""
    sizes = OPENAI_VIDEO_SIZES.get(resolution)
    return sizes[0] if sizes else None
