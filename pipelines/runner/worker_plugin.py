"""Imported first by every Beam SDK worker process of this project's jobs (the pipelines add
--beam_plugins=pipelines.runner.worker_plugin unless the patches are off): a worker process then
runs bundles with the speed-ups that the launching process has
(beam_patches.install_worker_speedups). They are gated there as in the launching process: on
an untested Beam, or with beam_patches.ENV=off in the worker's environment, the worker logs one
line and runs Beam as released."""

from pipelines.runner import beam_patches

beam_patches.install_worker_speedups()
