"""The Beam runner: which one a job runs on and with which options, the patches that make Beam
faster, and the progress a run shows while it goes."""
