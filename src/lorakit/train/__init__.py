"""Training, evaluation and sizing: `lorakit.train(...)` (the engine behind `lorakit train | eval | generate`).

Heavy libraries (transformers, matplotlib, sacrebleu) are imported only when a run needs them.
"""

from .options import TrainOptions
from .run import TrainResult, train

__all__ = ["train", "TrainResult", "TrainOptions"]
