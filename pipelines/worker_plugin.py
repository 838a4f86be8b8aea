"""Imported first by every Beam SDK worker process of this project's jobs (the pipelines add
--beam_plugins=pipelines.worker_plugin): a worker process then runs bundles with the speed-ups
that the launching process has (pipelines/common.py, install_worker_speedups)."""

from pipelines import common

common.install_worker_speedups()
