"""The one harness: variants (patches, prompt compressors, peers) x workloads x tasks -> one record -> one report.

>>> from tokenlean.eval import BenchConfig, run_bench
>>> record = run_bench(BenchConfig(model="smollm2-135m", methods=["sink_window:window=256"]), "runs/demo")
>>> record = run_bench(BenchConfig(compressors=["default"], rates=[0.5, 0.33], tasks=["needle"]), "runs/pc")
>>> record = run_bench(BenchConfig(methods=["sink_window:window=1020"], workload="long:lengths=1024+4096",
...                                tasks=["passkey:lengths=1024+2048,n=20"]), "runs/long")
"""

from .bench import BenchConfig, run_bench
from .context import BenchContext
from .latency import LatencySample, measure_generation
from .long_context import LongContextWorkload, LongPerplexityTask, PasskeyTask
from .sts import SimilarityTask, spearman
from .tasks import Example, FidelityTask, PerplexityTask, Task, get_task, register_task, task_names
from .variants import Variant, compressor_names, make_variants, register_compressor
from .workloads import Workload, register_workload, workload_names

__all__ = [
    "BenchConfig",
    "BenchContext",
    "Example",
    "FidelityTask",
    "LatencySample",
    "LongContextWorkload",
    "LongPerplexityTask",
    "PasskeyTask",
    "PerplexityTask",
    "SimilarityTask",
    "Task",
    "Variant",
    "Workload",
    "compressor_names",
    "get_task",
    "make_variants",
    "measure_generation",
    "register_compressor",
    "register_task",
    "register_workload",
    "run_bench",
    "spearman",
    "task_names",
    "workload_names",
]
