"""Imported first by every Beam SDK worker process of this project's jobs (the pipelines add
--beam_plugins=pipelines.runner.worker_plugin): a worker process then runs bundles with the
speed-ups that the launching process has (beam_patches.install_worker_speedups)."""

from pipelines.runner import beam_patches

beam_patches.install_worker_speedups()
