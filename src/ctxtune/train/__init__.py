"""Training: one run boundary. Build a `RunSpec`, call `run(spec, out)`; read run folders with `ctxtune.train.runs`."""

from ctxtune.train import lm_tasks  # noqa: F401 - registers the tasks built on a model's tokenizer
from ctxtune.train.config import TrainConfig
from ctxtune.train.run import RunResult, run
from ctxtune.train.spec import EvalSpec, RunSpec, StreamSpec

__all__ = ["EvalSpec", "RunResult", "RunSpec", "StreamSpec", "TrainConfig", "run"]
