"""Checks of tensors read from files (bank weights, artifacts, router state, peft adapters): dtypes as expected
and never cast silently, values finite, shapes as expected. Each failure names the file, the tensor and the fix."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import MtpeftError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _where(what: str, file) -> str:
    return f"{what}" + (f" ({file})" if file is not None else "")


def check_finite(name: str, t: torch.Tensor, what: str, file=None) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise MtpeftError(f"{_where(what, file)}: tensor {name!r} holds {bad} NaN or infinite value(s); such weights "
                          "give garbage outputs: restore the file from a good copy, or retrain")


def check_weights(tensors: Mapping[str, torch.Tensor], what: str, file=None) -> None:
    """Trainable weights: floating point (an integer tensor is refused, not cast) and finite."""
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise MtpeftError(f"{_where(what, file)}: {k!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in FLOATS:
            raise MtpeftError(f"{_where(what, file)}: tensor {k!r} is {str(t.dtype).replace('torch.', '')}, not "
                              "floating point; weights are float16/bfloat16/float32/float64 (mtpeft does not cast "
                              "other types): restore the file or re-create it")
        check_finite(k, t, what, file)


def check_like(tensors: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str, file=None) -> None:
    """``tensors`` must be exactly ``own``'s names, shapes and kinds (float vs integer vs bool), and finite."""
    if set(tensors) != set(own):
        raise MtpeftError(f"{_where(what, file)}: holds tensors {sorted(tensors)[:5]}, expected {sorted(own)[:5]}; "
                          "re-save it")
    for k, t in tensors.items():
        o = own[k]
        if tuple(t.shape) != tuple(o.shape):
            raise MtpeftError(f"{_where(what, file)}: tensor {k!r} has shape {tuple(t.shape)}, expected "
                              f"{tuple(o.shape)}; re-save it")
        if t.is_floating_point() != o.is_floating_point() or (t.dtype == torch.bool) != (o.dtype == torch.bool):
            raise MtpeftError(f"{_where(what, file)}: tensor {k!r} is {str(t.dtype).replace('torch.', '')}, expected "
                              f"{str(o.dtype).replace('torch.', '')}; re-save it (mtpeft does not cast)")
        check_finite(k, t, what, file)


def header_shapes(path, what: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a safetensors file's header, without reading the tensors."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise MtpeftError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MtpeftError(f"{what} {path} is corrupted or not safetensors ({e}); re-create it") from e


def dry_run(build):
    """``build()`` on the ``meta`` device (no memory): its state's ``{name: shape}``, or None when it cannot be
    built there (then the caller builds it for real and checks after)."""
    try:
        with torch.device("meta"):
            obj = build()
        return {k: tuple(v.shape) for k, v in obj.state_dict().items()}
    except Exception:  # noqa: BLE001 - a dry run only: the real build reports its own errors
        return None
