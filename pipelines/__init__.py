"""Batch jobs on Ray Data: ``run_job(JobConfig) -> JobSummary`` (``evf run`` on the command line).

See docs/pipeline.md for the manifest format, the outputs, resume and the config schema. Names are
imported lazily so that ``evf run --help`` does not pay for torch and Ray.
"""

from __future__ import annotations

from evf.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "evf.pipelines.config",
    "JobConfig": "evf.pipelines.config",
    "load_config": "evf.pipelines.config",
    "JobError": "evf.pipelines.job",
    "run_job": "evf.pipelines.job",
    "JobSummary": "evf.pipelines.summary",
    "format_summary": "evf.pipelines.summary",
    "evaluate": "evf.pipelines.evaluate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
