"""Dataset folders: preparing them from a user's images and masks, reading them, and the joint image.

A dataset folder (written by ``prepare``, ``demo-data`` and ``sample``) holds::

    images/NAME.png   micrograph, 8- or 16-bit, grey or RGB
    masks/NAME.png    uint8 class-index map
    classes.yaml      class names and display colours, in class order (+ source grey values)
    manifest.csv      file, split, source, tile_y, tile_x, origin, quality (+ extra columns)

- `dualsynth.data.folder`: classes, `DatasetFolder` (reading), `DatasetWriter` (atomic writing).
- `dualsynth.data.preparation`: `prepare` and its parts (pairing, mask decoding, tiling, splits).
- `dualsynth.data.joint`: the paper's joint image (`join_pair`, `split_joint`, `joint_to_pairs`) and the
  flips/rotations shared by the trainers (`dihedral`, `random_dihedral`).
"""

from dualsynth.data.folder import (
    ClassInfo,
    DEFAULT_PALETTE,
    DatasetFolder,
    DatasetWriter,
    MANIFEST_FIELDS,
    TileRecord,
    colorize_mask,
    default_classes,
    image_to_float,
    read_classes,
    safe_stem,
    write_classes,
)
from dualsynth.data.joint import (
    MASK_ENCODINGS,
    dihedral,
    join_pair,
    joint_to_pairs,
    mask_channels,
    mask_levels,
    random_dihedral,
    split_joint,
)
from dualsynth.data.preparation import (
    MASK_SUFFIX_RE,
    MAX_GREY_VALUES,
    Pair,
    PrepareOptions,
    assign_splits,
    find_pairs,
    mask_files_by_stem,
    mask_to_index,
    normalise_image,
    parse_intensity_range,
    prepare,
    read_split_file,
    tile_origins,
)
