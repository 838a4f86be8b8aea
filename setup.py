"""Package of the preprocessing pipelines, dataset transforms and trainer.

It is also what Beam ships to remote workers: `--setup_file ./setup.py` builds an sdist of
these packages and installs it on every Dataflow (or portable runner) worker.
"""

import setuptools

REQUIRED = [
    'tensorflow-transform>=1.21,<1.22',
    'tensorflow>=2.21,<2.22',
    'tf_keras>=2.21,<2.22',
    'tfx-bsl>=1.21,<1.22',
    'tensorflow-metadata>=1.21,<1.22',
    'apache-beam[gcp]>=2.77,<2.78',  # pipelines/runner/beam_patches.py is tested on 2.77 only
    'pyarrow>=14,<26',  # Beam 2.77 requires pyarrow < 26
    'tensorboard>=2.21,<2.22',  # the trainer's logs and profiles
    'numpy',
    'google-crc32c>=1.5',  # TFRecord checksums of the batched shard writer
    'isal>=1.6',  # its fast gzip compression (pipelines/sinks/tfrecords.py)
    'jinja2>=3.1,<4',  # the report's template (pipelines/report/templates)
]

setuptools.setup(
    name='tft-beam-preprocessing',
    version='0.1.0',
    description='CSV and image preprocessing with TF Transform on Apache Beam, and a Keras trainer',
    packages=setuptools.find_packages(include=['pipelines', 'pipelines.*', 'transforms',
                                               'transforms.*', 'trainer', 'trainer.*']),
    package_data={'pipelines.report': ['templates/*']},
    python_requires='>=3.10,<3.13',
    install_requires=REQUIRED,
    extras_require={'test': ['pytest>=8', 'pytest-xdist>=3.5',  # two test processes (Makefile)
                             'pandas>=2', 'pillow',  # PIL: independent decodes
                             'hypothesis>=6.100',  # tests/test_properties.py
                             'ai-edge-litert',  # LiteRT: runs the TFLite exports in the tests
                             'ruff>=0.6']},  # the linter (ruff.toml), run by `make test`
)
