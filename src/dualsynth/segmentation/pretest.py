"""The paper's quality pre-test of a synthetic set (§3.3, Fig. 12)."""

from __future__ import annotations

from pathlib import Path

from dualsynth.segmentation.evaluation import EvaluationResult, evaluate, write_evaluation
from dualsynth.segmentation.model import checkpoint_info, load_segmenter


def pretest(run: str | Path, synthetic: str | Path, out: str | Path, overlays: int = 4, device: str = "auto",
            progress: bool = True) -> EvaluationResult:
    """The paper's quality pre-test (§3.3, Fig. 12) of a synthetic set.

    A model trained on real data segments every synthetic micrograph; its prediction is the reference and
    the synthetic mask is scored against it, so a high Missing Class IoU means the synthetic mask says what a
    real-data model sees in the synthetic image. Writes the evaluation files and pretest.png (synthetic
    image / synthetic mask / prediction).
    """
    model = load_segmenter(run, device)
    result = evaluate(model, synthetic, None, keep_examples=max(overlays, 0), reference="prediction", progress=progress)
    result.info.update(model=str(Path(run)), **checkpoint_info(model),
                       note="the model's prediction is the reference; the synthetic masks are scored against it")
    write_evaluation(result, out, overlays, title=f"pre-test of {Path(synthetic).name} with {Path(run).name}",
                     figure_name="pretest.png", figure_columns=("synthetic image", "synthetic mask", "prediction"))
    return result

