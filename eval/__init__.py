"""The shared harness: latency, quality tasks and reports, baseline and methods side by side.

>>> from tokenlean.eval import BenchConfig, run_bench
>>> record = run_bench(BenchConfig(model="smollm2-135m", methods=["sink_window:window=256"]), "runs/demo")
"""

from .bench import BenchConfig, Variant, run_bench
from .latency import LatencySample, measure_generation
from .sts import SimilarityTask, spearman
from .tasks import Example, FidelityTask, PerplexityTask, Task, get_task, register_task, task_names

__all__ = [
    "BenchConfig",
    "Example",
    "FidelityTask",
    "LatencySample",
    "PerplexityTask",
    "SimilarityTask",
    "Task",
    "Variant",
    "get_task",
    "measure_generation",
    "register_task",
    "run_bench",
    "spearman",
    "task_names",
]
