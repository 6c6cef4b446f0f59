"""The joint image of the paper (micrograph channels plus mask channel(s)) and the flips/rotations every
trainer applies to images and masks alike.

`join_pair(image, mask)` builds it, `split_joint(joint)` takes it apart (exactly), `joint_to_pairs(batch)` turns
decoder output into (micrograph, mask) pairs.
"""

from __future__ import annotations


import numpy as np


MASK_ENCODINGS = ("levels", "onehot")


def mask_levels(num_classes: int):
    """The grey level of each class in the ``levels`` encoding: class k at k/(C-1)."""
    import torch

    if num_classes < 2:
        raise ValueError("a mask needs at least 2 classes")
    return torch.arange(num_classes, dtype=torch.float32) / (num_classes - 1)


def mask_channels(num_classes: int, encoding: str = "levels") -> int:
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"unknown mask encoding '{encoding}' ({', '.join(MASK_ENCODINGS)})")
    return 1 if encoding == "levels" else num_classes


def join_pair(image, mask, num_classes: int, encoding: str = "levels"):
    """Micrograph + class mask -> the joint float tensor of image channels and mask channel(s).

    ``image``: ``(C, H, W)`` / ``(B, C, H, W)`` tensor or ``(H, W)`` / ``(H, W, C)`` numpy array in [0, 1].
    ``mask``: ``(H, W)`` / ``(B, H, W)`` integer class indices. ``levels`` adds one channel with class k at
    ``k/(C-1)`` (the paper's grey mask); ``onehot`` adds ``C`` channels.
    """
    import torch

    image = _image_tensor(image)
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).long()
    batched = image.dim() == 4
    if mask.dim() != image.dim() - 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} do not match")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise ValueError(f"mask values must lie in 0..{num_classes - 1}")
    channel_dim = 1 if batched else 0
    if encoding == "levels":
        levels = mask_levels(num_classes).to(image.device)
        mask_part = levels[mask].unsqueeze(channel_dim)
    elif encoding == "onehot":
        mask_part = torch.nn.functional.one_hot(mask, num_classes).to(image.dtype)
        mask_part = mask_part.permute(0, 3, 1, 2) if batched else mask_part.permute(2, 0, 1)
    else:
        raise ValueError(f"unknown mask encoding '{encoding}' ({', '.join(MASK_ENCODINGS)})")
    return torch.cat([image, mask_part.to(image.dtype)], dim=channel_dim)


def split_joint(joint, num_classes: int, encoding: str = "levels"):
    """The joint tensor -> ``(image, mask)``: image channels as they are, mask by nearest level or argmax."""
    import torch

    joint = torch.as_tensor(joint)
    batched = joint.dim() == 4
    channel_dim = 1 if batched else 0
    n_mask = mask_channels(num_classes, encoding)
    n_image = joint.shape[channel_dim] - n_mask
    if n_image < 1:
        raise ValueError(f"joint tensor with {joint.shape[channel_dim]} channels has no image channels")
    image, mask_part = torch.split(joint, [n_image, n_mask], dim=channel_dim)
    if encoding == "levels":
        levels = mask_levels(num_classes).to(joint.device)
        values = mask_part.squeeze(channel_dim).float()
        mask = (values.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    else:
        mask = mask_part.argmax(dim=channel_dim)
    return image, mask


def joint_to_pairs(joint, num_classes: int, encoding: str = "levels") -> list[tuple[np.ndarray, np.ndarray]]:
    """Joint images (B, C, H, W) -> [(image (H, W, C_img) float32 clipped to [0, 1], mask (H, W) int)]."""
    import torch

    out = []
    for x in torch.as_tensor(joint):
        image, mask = split_joint(x, num_classes, encoding)
        image = np.moveaxis(np.asarray(image.detach().cpu(), dtype=np.float32), 0, -1)
        out.append((np.clip(image, 0.0, 1.0), np.asarray(mask)))
    return out


def dihedral(x, k: int, flip: bool, axes: tuple[int, int] = (-2, -1)):
    """`x` (numpy array or torch tensor) rotated k times by 90 degrees in the plane of `axes`, then mirrored
    along the second of them if `flip`: one of the 8 symmetries of a square."""
    import torch

    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, k, dims=axes) if k else x
        return torch.flip(x, dims=(axes[1],)) if flip else x
    x = np.rot90(x, k, axes=axes) if k else x
    return np.flip(x, axis=axes[1]) if flip else x


def random_dihedral(rng: np.random.Generator, *arrays, axes: tuple[int, int] = (-2, -1)) -> tuple:
    """The same random flip/rotation applied to every array (image and mask alike), drawn from `rng`.

    Micrographs have no preferred orientation, so the 8 symmetries of a square are free extra data;
    non-square arrays only take the rotations that keep their shape (0 and 180 degrees).
    """
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    first = arrays[0]
    if first.shape[axes[0]] != first.shape[axes[1]]:
        k = 2 * (k % 2)
    return tuple(dihedral(a, k, flip, axes) for a in arrays)


def _image_tensor(image):
    import torch

    if isinstance(image, torch.Tensor):
        return image.float()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(array))


