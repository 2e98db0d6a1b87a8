"""Training, evaluation and sizing: the engine behind `lorakit train | eval | generate | merge | info | estimate`.

Heavy libraries (transformers, matplotlib, sacrebleu) are imported only when a command runs.
"""

from .run import TrainResult, train
from .options import (EstimateOptions, EvalOptions, GenerateOptions, InfoOptions, MergeOptions, TrainOptions)

__all__ = ["train", "TrainResult", "TrainOptions", "EvalOptions", "GenerateOptions", "MergeOptions", "InfoOptions",
           "EstimateOptions"]
