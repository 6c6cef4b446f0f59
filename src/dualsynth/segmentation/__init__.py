"""U-Net segmentation: the model (paper Table 3), which tiles a run uses, training on the one engine,
evaluation with the paper's metrics, and the quality pre-test.

- `model`: `UNet`, `build_unet`, encoder weights, `load_segmenter`, `predict`.
- `data`: `select_training_data` (real + synthetic tiles), `TileCache`, `tile_batch`, augmentation (`CopyPaste`).
- `training`: `SegTrainConfig`, `PRESETS`, `train_segmentation`.
- `evaluation`: `evaluate`, `evaluate_run`, `write_evaluation`, `evaluate_mask_folders`, `format_evaluation`.
- `pretest`: `pretest`.
"""

from dualsynth.segmentation.data import (
    CopyPaste,
    TileCache,
    TrainingData,
    check_compatible,
    draw_synthetic,
    paper_augmentation,
    select_training_data,
    synthetic_count,
    synthetic_records,
    tile_batch,
)
from dualsynth.segmentation.evaluation import (
    EvaluationResult,
    evaluate,
    evaluate_mask_folders,
    evaluate_run,
    format_evaluation,
    overlay,
    overlay_strip,
    per_class_rows,
    write_evaluation,
)
from dualsynth.segmentation.model import (
    KIND,
    UNet,
    UNetArchitecture,
    UNetConfig,
    build_unet,
    load_encoder_weights,
    load_segmenter,
    predict,
    predict_batch,
    read_state_dict,
)
from dualsynth.segmentation.pretest import pretest
from dualsynth.segmentation.training import MONITORS, PRESETS, SegTrainConfig, saved_run_config, train_segmentation

__all__ = [name for name in dir() if not name.startswith("_")]
