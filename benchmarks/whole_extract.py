"""The reference extract without its streaming hook: the whole-file path, for
``benchmarks.memory`` to measure beside the streamed one."""

from worker.loader.extract.reference import processOutputData

__all__ = ["processOutputData"]
