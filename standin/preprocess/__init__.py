"""Reference photo preprocessing (docs/method.md section 6): face crop, white padding, 512x512, white background.

The names below load on first use (PEP 562), so that importing standin.preprocess.cli to build the command line
does not import cv2."""

import importlib

_WHERE = {
    "ParsingModel": "background",
    "grabcut_person_mask": "background",
    "ImageLoadError": "images",
    "load_image": "images",
    "PreprocessResult": "reference",
    "preprocess_reference": "reference",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
