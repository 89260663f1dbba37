"""The public Python API: a facade that re-exports each stage's function and config, and their composition.

Nothing is implemented here; every name lives in the module of its stage (``edgekit.pipeline`` composes them).
"""

from __future__ import annotations

from edgekit.benchmarks.bench import BenchConfig, BenchReport, bench
from edgekit.benchmarks.decode import DecodeBenchReport, bench_decoders
from edgekit.compress.prune import PruneConfig, PruneReport, prune
from edgekit.compress.quantize import QuantizeConfig, QuantizeReport
from edgekit.generate import Generation, generate
from edgekit.pipeline import CompressConfig, CompressReport, compress, demo, demo_checkpoint, demo_config, demo_data, quantize
from edgekit.release.triton import TritonConfig, TritonReport, triton_repository
from edgekit.runtimes.base import load as load_runtime
from edgekit.runtimes.export import ExportConfig, ExportReport, export
from edgekit.search import SearchConfig, SearchReport, search
from edgekit.serve.config import ServeConfig
from edgekit.serve.server import build_app, serve
from edgekit.verify import GateConfig, VerifyConfig, VerifyReport, verify

__all__ = ["export", "prune", "quantize", "verify", "bench", "compress", "demo", "load_runtime", "ExportConfig",
           "PruneConfig", "PruneReport", "QuantizeConfig", "VerifyConfig", "GateConfig", "BenchConfig",
           "CompressConfig", "CompressReport", "ExportReport", "QuantizeReport", "VerifyReport", "BenchReport",
           "demo_checkpoint", "demo_config", "demo_data", "generate", "Generation", "bench_decoders",
           "DecodeBenchReport", "serve", "build_app", "ServeConfig", "triton_repository", "TritonConfig", "TritonReport",
           "search", "SearchConfig", "SearchReport"]
