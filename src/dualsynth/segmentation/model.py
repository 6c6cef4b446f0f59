"""The U-Net of the segmentation study: segmentation-models-pytorch's `Unet` wrapped so that it knows its config
(encoder, depth, decoder widths, input channels, classes), takes tiles of any size, and saves and loads with
that config; encoder initialisation from ImageNet weights (never downloaded at run time) or a local file; and
inference (`load_segmenter`, `predict_batch`, `predict`).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from dualsynth.config import StrictModel, autocast, resolve_device
from dualsynth.data import ClassInfo
from dualsynth.errors import InputError
from dualsynth.runs import RunFolder

KIND = "segmentation"


class UNetArchitecture(StrictModel):
    """The U-Net of segmentation-models-pytorch: encoder (backbone) name, depth and decoder widths."""

    encoder: str = Field("efficientnet-b3", description="smp encoder name (paper: EfficientNet-B3)")
    encoder_depth: int = Field(5, ge=3, le=5, description="number of encoder stages (downsampling by 2 each)")
    decoder_channels: list[int] = Field(
        default_factory=lambda: [256, 128, 64, 32, 16], description="decoder widths, one per encoder stage"
    )
    normalize: Literal["none", "per_image"] = Field(
        "none", description="per_image: each tile's channels scaled to zero mean and unit variance before the U-Net"
    )

    @model_validator(mode="after")
    def _depth_matches_decoder(self) -> "UNetArchitecture":
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries, encoder_depth is {self.encoder_depth}"
            )
        return self




# --- the model ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """What rebuilds a trained U-Net: architecture, input channels, classes (names and display colours)."""

    encoder: str
    encoder_depth: int
    decoder_channels: list[int]
    in_channels: int
    classes: list[dict[str, Any]]
    normalize: str = "none"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_infos(self) -> list[ClassInfo]:
        return [ClassInfo(c["name"], tuple(c["color"])) for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder, "encoder_depth": self.encoder_depth,
            "decoder_channels": list(self.decoder_channels), "in_channels": self.in_channels,
            "classes": [dict(c) for c in self.classes], "normalize": self.normalize,
        }


class UNet(torch.nn.Module):
    """An smp U-Net that knows its config and takes tiles of any size.

    smp's U-Net needs sides divisible by 2**encoder_depth; `forward` pads the input (reflecting the border)
    and crops the logits back, so 100 px tiles work as well as 128 px ones.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.config = config
        try:
            self.net = smp.Unet(
                encoder_name=config.encoder,
                encoder_depth=config.encoder_depth,
                encoder_weights=None,  # weights are loaded from local files only (build_unet)
                decoder_channels=list(config.decoder_channels),
                in_channels=config.in_channels,
                classes=config.num_classes,
            )
        except KeyError:
            raise InputError("model.encoder", f"unknown encoder '{config.encoder}' (see the encoder list of "
                             "segmentation-models-pytorch)") from None
        except (RuntimeError, ValueError) as exc:
            if "timm" in str(exc).lower() or "unknown model" in str(exc).lower():
                raise InputError("model.encoder", f"'{config.encoder}' is not an encoder smp can build") from None
            raise

    @property
    def multiple(self) -> int:
        return 2 ** self.config.encoder_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.normalize == "per_image":
            # micrographs differ in brightness and contrast from image to image more than within one
            mean = x.mean(dim=(-2, -1), keepdim=True)
            std = x.std(dim=(-2, -1), keepdim=True)
            x = (x - mean) / std.clamp_min(1e-3)  # flat tiles stay finite
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., :h, :w]

    def checkpoint(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "UNet":
        model = cls(UNetConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model


def build_unet(arch: UNetArchitecture, in_channels: int, classes: Sequence[ClassInfo], encoder_weights: str = "none") -> UNet:
    """A fresh U-Net for `in_channels` image channels and these classes, its encoder initialised from
    `encoder_weights`: `none` (random), `imagenet` (from the local cache, see `imagenet_weights_file`) or a
    local state-dict file."""
    config = UNetConfig(arch.encoder, arch.encoder_depth, list(arch.decoder_channels), int(in_channels),
                        [ClassInfo(c.name, c.color).to_dict() for c in classes], arch.normalize)
    model = UNet(config)
    if encoder_weights == "imagenet":
        load_encoder_weights(model, imagenet_weights_file(arch.encoder))
    elif encoder_weights != "none":
        load_encoder_weights(model, encoder_weights)
    return model


def imagenet_weights_file(encoder: str) -> Path:
    """The local file of smp's ImageNet weights for `encoder`; nothing is ever downloaded at run time.

    Looked up in the Hugging Face cache, where segmentation-models-pytorch keeps them (`smp-hub/<encoder>.imagenet`,
    under HF_HOME or ~/.cache/huggingface), then in torch's hub cache (older smp releases). Absent: an input
    error that says how to provide them once.
    """
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if settings is None:
        raise InputError("--encoder-weights", f"smp has no ImageNet weights for '{encoder}'; give a local file or none")
    repo_id, revision = settings.get("repo_id"), settings.get("revision")
    if repo_id:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model.safetensors", revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    url = settings.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.is_file():
            return cached
    how = (f"fetch them once with `hf download {repo_id} model.safetensors`" if repo_id
           else f"download {url} into {Path(torch.hub.get_dir()) / 'checkpoints'}")
    raise InputError("--encoder-weights", f"ImageNet weights for '{encoder}' are not in the local cache; {how}, "
                     "or give a local encoder state-dict file (or none)")


def check_encoder_weights(weights: str, encoder: str) -> None:
    """Fail early (before anything is written) when `encoder_weights` names a file or cache entry that is absent."""
    if weights == "imagenet":
        imagenet_weights_file(encoder)
    elif weights != "none" and not Path(weights).is_file():
        raise InputError(weights, "encoder weights file not found (use none, imagenet or a file)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors`, `.pt` or `.pth` file; a checkpoint that wraps it under `model` or
    `state_dict` is unwrapped, and `net.encoder.` / `encoder.` key prefixes are removed (whole U-Nets)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder weights file not found (use none, imagenet or a file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot read encoder weights ({type(exc).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "not a state dict (a mapping of parameter names to tensors)")
    for prefix in ("net.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def load_encoder_weights(model: UNet, path: str | Path) -> None:
    """Initialise the model's encoder from a local state-dict file.

    The file may hold weights for the model's own input channels, or 3-channel (ImageNet-style) weights: those
    are adapted to the model's channels the way smp adapts its own pretrained weights (`set_in_channels`), so
    a file saved from any smp encoder of the same name works for grey and RGB data alike.
    """
    import segmentation_models_pytorch as smp

    state = read_state_dict(path)
    encoder = model.net.encoder
    own = encoder.state_dict()
    if _same_shapes(state, own):
        encoder.load_state_dict(state)
        return
    c = model.config
    if c.in_channels != 3:
        rgb = smp.encoders.get_encoder(c.encoder, in_channels=3, depth=c.encoder_depth, weights=None)
        if _same_shapes(state, rgb.state_dict()):
            rgb.load_state_dict(state)
            rgb.set_in_channels(c.in_channels, pretrained=True)
            encoder.load_state_dict(rgb.state_dict())
            return
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    detail = f"missing '{missing[0]}'" if missing else f"shape of '{wrong[0]}' differs" if wrong else "extra keys"
    raise InputError(path, f"weights do not fit the '{c.encoder}' encoder with depth {c.encoder_depth} ({detail})")


def _same_shapes(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> bool:
    return set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()



# --- inference ----------------------------------------------------------------------------------------------


def load_segmenter(run: str | Path, device: str | torch.device = "auto", checkpoint: str = "best") -> UNet:
    """The trained U-Net of a run folder (its `best` checkpoint, else `last`), in eval mode on `device`."""
    folder = RunFolder.open(run, kind=KIND)
    dev = resolve_device(device) if isinstance(device, str) else device
    ckpt = folder.load_trained(checkpoint, map_location=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = UNet.from_checkpoint(ckpt)
    model.checkpoint_epoch = ckpt.get("epoch")  # type: ignore[attr-defined]
    model.checkpoint_step = ckpt.get("step")  # type: ignore[attr-defined]  # runs trained in step mode
    return model.to(dev).eval()


def checkpoint_info(model: Any) -> dict[str, Any]:
    """Which iteration a loaded segmenter's checkpoint is from: its epoch, and its step for step-mode runs."""
    info = {"checkpoint_epoch": getattr(model, "checkpoint_epoch", None)}
    if getattr(model, "checkpoint_step", None) is not None:
        info["checkpoint_step"] = model.checkpoint_step
    return info


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def predict_batch(model: Any, images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float images -> (B, H, W) int64 class masks (argmax of the model's logits)."""
    dev = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad(), autocast(dev):
            logits = model(images.to(dev))
    finally:
        if was_training:
            model.train()
    return logits.argmax(1).cpu().numpy().astype(np.int64)


def predict(model: Any, image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Segment one micrograph: float (H, W) / (H, W, C) array in [0, 1] or (C, H, W) tensor -> (H, W) mask."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim == 2:
            x = x[None]
    else:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0)))
    return predict_batch(model, x[None])[0]


