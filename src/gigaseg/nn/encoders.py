"""timm encoders behind one small contract: a list of feature maps, fine to coarse.

``Encoder`` wraps ``timm.create_model(name, features_only=True, ...)``. Decoders read
``out_channels`` and ``reductions`` (timm's ``feature_info.channels()/reduction()`` for the
selected levels) and ``output_stride`` (the coarsest reduction), as in
segmentation_models_pytorch's encoder contract.

Which levels: by default the last four feature levels whose reduction is >= 4. For the
ResNet family that is ``out_indices=(1, 2, 3, 4)``: c2..c5 at strides 4, 8, 16, 32 (the
stride-2 stem output is skipped). ConvNeXt/Swin-style models have only those four levels
(``(0, 1, 2, 3)``). Plain ViTs have all levels at stride 16: the last four blocks are taken
and every map is at 1/16. Pass ``out_indices`` to choose yourself.

Pretrained weights:

- ``pretrained=True``: timm's own weights (Hugging Face hub download). When the hub is
  unreachable, or timm has no weights for the name, a ``ConfigError`` says how to pass a
  local file instead.
- ``pretrained="/path/to/weights.(pth|pt|bin|safetensors)"``: a local file holding either a
  full timm classification state dict of the same architecture (``timm.create_model(name)
  .state_dict()``; the classifier and other head layers a feature extractor drops are
  ignored) or a ``features_only`` state dict (``Encoder(...).model.state_dict()``).
  Checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.``
  prefixes are undone as timm does. Any other missing or unexpected key, or a shape that
  does not match, is an error naming the keys: nothing is silently left random. The file is
  read with ``torch.load(weights_only=True)`` (or safetensors): loading it cannot run code.

With ``in_channels != 3`` the 3-channel pretrained first convolution is adapted as timm does
(``timm.models.adapt_input_conv``: summed for 1 channel, repeated and rescaled otherwise).

The stride-2 level (for decoders that predict finer than 1/4, ``gigaseg.nn.decoders``):
``Encoder(name, stride2=True)`` also extracts the deepest feature level with reduction 2 that
lies before the returned levels (a ResNet's stem activation ``act1``, an EfficientNet's
``blocks.0``), when the model has one; :meth:`Encoder.forward_with_stride2` returns it with
the usual maps, and ``stride2_channels`` gives its width (None when the model has no such
level: ConvNeXt, Swin, ViT). That level is computed on the way to the others, so the
extractor's modules, state dict and other maps are exactly those of ``stride2=False``;
``forward``, ``out_indices``, ``out_channels`` and ``reductions`` still describe only the
usual levels.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Sequence

import timm
import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Encoder", "PretrainedSpec", "check_encoder_name", "default_out_indices", "load_weights_file"]

#: what ``pretrained`` accepts: False/None (random init), True (timm's weights) or a local file
PretrainedSpec = bool | str | os.PathLike | None


def default_out_indices(levels: Sequence[dict]) -> tuple[int, ...]:
    """The encoder levels returned by default: the last four whose reduction is >= 4.

    Args:
        levels: timm's full ``feature_info`` (one dict with a ``"reduction"`` per level).

    Returns:
        The indices of those levels (fewer when the model has fewer).

    Raises:
        ConfigError: no level has a reduction >= 4.
    """
    keep = [i for i, level in enumerate(levels) if level["reduction"] >= 4]
    if not keep:
        raise ConfigError("the encoder has no feature level with a reduction >= 4")
    return tuple(keep[-4:])


class Encoder(nn.Module):
    """A timm backbone that returns ``len(out_channels)`` NCHW feature maps, fine to coarse.

    Args:
        name: any timm model name that supports ``features_only`` (``timm.list_models()``),
            optionally with a pretrained tag (``"resnet50.a1_in1k"``).
        in_channels: input bands (RGB = 3; multispectral and grey inputs work too).
        pretrained: False (random init), True (timm's weights) or a local weights file.
        out_indices: timm feature levels to return (default: see the module docstring).
        output_stride: dilate the last stages so the coarsest map is at this stride
            (timm's ``output_stride``; 8, 16 or 32 where the model supports it).
        stride2: also extract the level with reduction 2 when the model has one (see the
            module docstring and :meth:`forward_with_stride2`).

    Raises:
        ConfigError: an unknown name, bad ``in_channels``, a model timm cannot build as a
            feature extractor, or pretrained weights that cannot be fetched or loaded.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        out_indices: Sequence[int] | None = None,
        output_stride: int | None = None,
        stride2: bool = False,
    ):
        super().__init__()
        check_encoder_name(name)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.name = name
        self.in_channels = in_channels
        kwargs: dict = {"in_chans": in_channels}
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        levels = _feature_levels(name, kwargs) if out_indices is None or stride2 else None
        if out_indices is None:
            out_indices = default_out_indices(levels)
        out_indices = tuple(int(i) for i in out_indices)
        #: the timm index of the extra stride-2 level, or None
        self._stride2_index: int | None = _stride2_index(levels, out_indices) if stride2 else None
        if self._stride2_index is not None:
            out_indices = (self._stride2_index, *out_indices)
        kwargs["out_indices"] = out_indices

        if pretrained is True:
            self.model = _create_with_timm_weights(name, kwargs)
        else:
            self.model = _create(name, kwargs)
            if pretrained not in (False, None):
                if not isinstance(pretrained, (str, os.PathLike)):
                    raise ConfigError(f"pretrained must be True, False or a weights file path, got {pretrained!r}")
                load_weights_file(self.model, name, pretrained, kwargs)

        info = self.model.feature_info
        skip = 0 if self._stride2_index is None else 1  # the extra stride-2 level comes first
        self.out_indices: tuple[int, ...] = tuple(info.out_indices)[skip:]
        self.out_channels: list[int] = list(info.channels())[skip:]
        self.reductions: list[int] = list(info.reduction())[skip:]
        #: channels of the stride-2 level (``stride2=True`` and the model has one), else None
        self.stride2_channels: int | None = info.channels()[0] if skip else None
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last_output = getattr(fmt, "value", fmt) == "NHWC"

    @property
    def output_stride(self) -> int:
        """Reduction of the coarsest returned map (32 for a ResNet's c5)."""
        return max(self.reductions)

    @property
    def pretrained_cfg(self) -> dict:
        """timm's pretrained config (input mean/std, first conv, ...)."""
        return self.model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps of ``x``.

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            One NCHW map per level of ``out_indices``, fine to coarse (``out_channels`` channels,
            ``reductions`` times smaller than ``x``).
        """
        return self.forward_with_stride2(x)[1]

    def forward_with_stride2(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The stride-2 map and the usual feature maps of ``x``, from one pass.

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            ``(stride2, maps)``: ``stride2`` is the ``(B, stride2_channels, ~H/2, ~W/2)`` map
            (its exact size is the encoder's: ``ceil(H / 2)`` for a ResNet stem), or None when
            the encoder was built without ``stride2`` or the model has no such level; ``maps``
            is what :meth:`forward` returns.
        """
        features = list(self.model(x))
        if self._channels_last_output:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if self._stride2_index is None:
            return None, features
        return features[0], features[1:]


# ------------------------------------------------------------------------- building


def _stride2_index(levels: Sequence[dict], out_indices: Sequence[int]) -> int | None:
    """The deepest level with reduction 2 before the first of ``out_indices``, or None."""
    if not levels or not out_indices:
        return None
    first = min(i % len(levels) for i in out_indices)  # timm accepts negative indices
    found = [i for i, level in enumerate(levels[:first]) if level["reduction"] == 2]
    return found[-1] if found else None


def check_encoder_name(name: str) -> None:
    """Check that ``name`` is a timm model name (``hf-hub:``, ``hf_hub:`` and ``local-dir:`` names pass).

    Args:
        name: the encoder's name.

    Raises:
        ConfigError: ``name`` is not a timm model name (the message lists close matches).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"encoder must be a timm model name, got {name!r}")
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown encoder {name!r}{hint} (any timm model name works: timm.list_models())")


def _create(name: str, kwargs: dict) -> nn.Module:
    """The feature extractor with random weights; build errors become a ConfigError."""
    try:
        return timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise ConfigError(
            f"encoder {name!r} cannot be built as a feature extractor with {kwargs} ({type(error).__name__}: {error})"
        ) from None


def _feature_levels(name: str, kwargs: dict) -> list[dict]:
    """timm's full feature_info (every level) for ``name``; built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    except Exception:  # some models compute numbers from tensors at build time: build for real
        probe = _create(name, kwargs)
    return list(probe.feature_info.info)


def _create_with_timm_weights(name: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, features_only=True, pretrained=True, **kwargs)
    except Exception as error:  # network, hub and cache errors come in many types
        if "No pretrained weights exist" in str(error):
            raise ConfigError(
                f"timm has no pretrained weights for encoder {name!r}; use pretrained=False "
                f"or pass a local weights file as pretrained='/path/to/weights.safetensors'"
            ) from None
        raise ConfigError(
            f"could not get timm's pretrained weights for encoder {name!r} ({type(error).__name__}: {error}). "
            f"Without access to the Hugging Face hub, save the weights where you can reach it "
            f"(torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), '{name}.pth')) "
            f"and pass the local file: pretrained='/path/to/{name}.pth'"
        ) from None


# ------------------------------------------------------------------------- local weights


def _plain(key: str) -> str:
    """Key with dots and underscores made equal: timm's feature wrappers flatten
    ``blocks.0`` into ``blocks_0`` and the getter wrapper prefixes ``model.``."""
    return key.replace(".", "_")


#: entries of a training checkpoint that hold its state dict, in the order timm looks for them (EMA first)
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")

#: prefixes of wrapped modules (DDP, torch.compile), removed as timm's ``clean_state_dict`` does
_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")


def _read_weights(path: str):
    """A weights file's state dict, read as timm's ``load_state_dict`` reads it, but never unpickling code.

    ``.safetensors`` files go through safetensors; anything else through ``torch.load(...,
    weights_only=True)`` (stated here, not left to timm's or torch's default). A checkpoint
    wrapper (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``) is unwrapped and
    ``module.`` / ``_orig_mod.`` prefixes are removed.
    """
    if path.lower().endswith(".safetensors"):
        try:
            import safetensors.torch
        except ImportError:
            raise ConfigError(f"{path}: reading .safetensors weights needs the safetensors package") from None
        state = safetensors.torch.load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        wrapper = next((key for key in _WRAPPERS if state.get(key) is not None), None)
        state = state[wrapper] if wrapper is not None else state
    if isinstance(state, dict):
        cleaned = {}
        for key, value in state.items():
            if isinstance(key, str) and key.startswith(_PREFIXES):
                for prefix in _PREFIXES:
                    key = key.removeprefix(prefix)
            cleaned[key] = value
        state = cleaned
    return state


def load_weights_file(model: nn.Module, name: str, path: str | os.PathLike, kwargs: dict) -> None:
    """Load a local classification or features_only state dict into timm feature model ``model``.

    A full classification state dict is matched by name (ignoring the head the extractor
    drops); a first convolution for 3 channels is adapted to ``in_chans`` as timm does.

    Args:
        model: the ``features_only`` model to load into.
        name: its timm model name.
        path: the weights file (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``).
        kwargs: the arguments the model was created with (``in_chans``, ``out_indices``, ...).

    Raises:
        ConfigError: the file is missing or unreadable, does not hold a state dict of tensors,
            has missing or unexpected keys, or shapes that do not match.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: pretrained weights file not found")
    try:
        state = _read_weights(path)
    except ConfigError:
        raise
    except Exception as error:  # zip, pickle, safetensors errors: all mean "not a weights file"
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            why = (
                "it holds pickled objects other than tensors, which could run code when loaded; "
                "save a plain state dict, e.g. torch.save(model.state_dict(), path)"
            )
        else:
            why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        raise ConfigError(f"{path}: not a readable weights file ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: does not hold a state dict of tensors")

    target = model.state_dict()
    if set(state) == set(target):  # a features_only state dict of this very extractor
        source_keys = {k: k for k in target}
    else:  # a full classification state dict: match by name, ignore the head the extractor drops
        lookup = {_plain(k): k for k in state}
        source_keys = {}
        for key in target:
            found = lookup.get(_plain(key))
            if found is None and key.startswith("model."):
                found = lookup.get(_plain(key[len("model.") :]))
            if found is not None:
                source_keys[key] = found
        full = _full_model_keys(name, kwargs)
        used = set(source_keys.values())
        missing = [k for k in target if k not in source_keys]
        unexpected = [k for k in state if k not in used and k not in full]
        if missing or unexpected:
            raise ConfigError(f"{path}: not a state dict of timm {name!r}: " + _describe(missing, unexpected))

    in_chans = kwargs.get("in_chans", 3)
    first = model.pretrained_cfg.get("first_conv") or ()
    first_weights = {_plain(f"{conv}.weight") for conv in ((first,) if isinstance(first, str) else first)}
    loaded, wrong = {}, []
    for key, src in source_keys.items():
        value, want = state[src], target[key]
        if (
            value.shape != want.shape
            and _plain(key.removeprefix("model.")) in first_weights
            and value.ndim == 4
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            try:
                value = timm.models.adapt_input_conv(in_chans, value)
            except NotImplementedError as error:
                raise ConfigError(f"{path}: cannot adapt {src} to {in_chans} input channels ({error})") from None
        if value.shape != want.shape:
            wrong.append(f"{src} {tuple(value.shape)} (encoder wants {tuple(want.shape)})")
        loaded[key] = value
    if wrong:
        raise ConfigError(
            f"{path}: shapes do not match timm {name!r}: {', '.join(wrong[:5])}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    model.load_state_dict(loaded, strict=True)


def _full_model_keys(name: str, kwargs: dict) -> set[str]:
    """State-dict keys of the whole classification model (head included), built on meta."""
    kwargs = {k: v for k, v in kwargs.items() if k != "out_indices"}
    try:
        with torch.device("meta"):
            full = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:
        full = timm.create_model(name, pretrained=False, **kwargs)
    return set(full.state_dict())


def _describe(missing: list[str], unexpected: list[str], show: int = 5) -> str:
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:show])}{more})")
    return "; ".join(parts)
