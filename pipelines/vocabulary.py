"""A faster implementation of TF Transform's frequency vocabulary accumulation, same result.

TFT 1.21 counts the tokens of an unweighted `tft.vocabulary` (and of everything built on it:
compute_and_apply_vocabulary, image labels, ...) by turning every token of every batch into a Beam
element and counting them with `Count.PerElement`: on 1M rows and 4 string columns that is 4M
elements through Beam's per-element machinery, the largest single cost of the analysis
(benchmarks/tabular_pipeline.py); counting per batch saved about 1.5 s of a 1M-row run (paired
runs 0.95x, benchmarks/RESULTS.md). Weighted vocabularies do not pay it because TFT sums their
weights per batch inside the graph.

This module registers, through TFT's own extension point (`register_ptransform`, which the
analyzer graph consults when it builds the Beam pipeline), an implementation of the
VocabularyAccumulate operation that counts each batch's tokens at once with a C-implemented
`collections.Counter`, sums the counts of a bundle in tables that cross the runner (16 shards of
{token: count}, vocabulary_packing.SHARDS) and are summed per shard, and gives the (token, count)
pairs of the sums. The output is the same (token, count) pairs TFT's `Count.PerElement`
produces, so pruning, ordering (count, then token), the vocabulary files, the analyzer cache and
everything downstream are unchanged; tests/test_fast_path.py compares the vocabulary files with
TFT's own path byte for byte. Every other ordering (weighted, mutual information, labels) keeps
TFT's implementation.

It builds on private names of TF Transform 1.21 (analyzer_impls._VocabularyAccumulateImpl,
analyzers._VocabOrderingType), so it is registered only on the TF Transform versions it was
tested with (TESTED_TFT) and where those names exist, and not where this project's Beam patches
are switched off (pipelines/runner/beam_patches.py, ENV); TFT's own implementation runs there.
Could live upstream: TFT's VocabularyAccumulate could count each batch's tokens itself.
"""

import contextlib
import logging
from typing import Any

import apache_beam as beam
import tensorflow_transform as tft
from tensorflow_transform import analyzer_nodes
from tensorflow_transform.beam import analyzer_impls
from tensorflow_transform.beam import common as tft_beam_common

from pipelines import (
  analysis_graph,
  binding_packing,
  cache_packing,
  merge_packing,
  span_counting,
  vocabulary_packing,
  warm_session,
)
from pipelines.runner import beam_patches

_LOG = logging.getLogger('pipelines')

# What this was written and tested against: TF Transform's versions (major.minor), and the
# private names of TFT's that it builds on (their absence, or another TFT, leaves TFT's own).
TESTED_TFT = ('1.21',)
_TFT_IMPLEMENTATION = getattr(analyzer_impls, '_VocabularyAccumulateImpl', None)
# The rewrites of TF Transform's analysis graph that install() switches on with the counting, in
# their order: the bindings' packing recognizes the packed vocabularies and merges.
REWRITES = (vocabulary_packing.pack, merge_packing.pack, binding_packing.pack)
# ... and those where it reads an analyzer cache (analysis_graph.py).
CACHE_REWRITES = (cache_packing.decode_together, cache_packing.decode_each,
                  cache_packing.flatten_once,
                  cache_packing.key_together, merge_packing.pack, vocabulary_packing.pack_merges,
                  cache_packing.count_together, span_counting.count_together,
                  binding_packing.pack)
# ... and of the output cache, where analysis_cache.write_cache writes it.
OUTPUT_CACHE_REWRITES = (cache_packing.encode_together, span_counting.encode_together)


def tft_tested(tft_version=None):
  """Whether TF Transform `tft_version` (the installed one by default) is one of TESTED_TFT, by
  major and minor version: the gate of every reach into TF Transform's internals."""
  tft_version = tft.__version__ if tft_version is None else tft_version
  return '.'.join(tft_version.split('.')[:2]) in TESTED_TFT


def unfit_reason(tft_version=None):
  """Why the per-batch counting and the packing (vocabulary_packing.py) do not fit TF Transform
  `tft_version` (the installed one by default): None where they do."""
  if not tft_tested(tft_version):
    return f'tested on TF Transform {", ".join(TESTED_TFT)} only'
  if vocabulary_packing.FREQUENCY is None or _TFT_IMPLEMENTATION is None:
    return ('TF Transform has no analyzers._VocabOrderingType.FREQUENCY or '
            'beam.analyzer_impls._VocabularyAccumulateImpl')
  missing = (vocabulary_packing.missing() + merge_packing.missing() +
             binding_packing.missing() + cache_packing.missing() + span_counting.missing() +
             warm_session.missing())
  if missing:
    return f'TF Transform has no {", ".join(missing)}'
  return None


class _BatchCountedVocabularyAccumulate(beam.PTransform):
  """VocabularyAccumulate: per-batch counts for frequency vocabularies, TFT's own otherwise."""

  def __init__(self, operation, extra_args):
    super().__init__()
    self._frequency = operation.vocab_ordering_type == vocabulary_packing.FREQUENCY
    self._tft = _TFT_IMPLEMENTATION(operation, extra_args)

  def expand(self, inputs):
    if not self._frequency:
      return self._tft.expand(inputs)
    (batches,) = inputs
    # The counts cross the runner as tables, as the packed vocabularies' do (vocabulary_packing,
    # SHARDS); TF Transform's (token, count) pairs come out of the summed tables.
    return (batches
            | 'CountTokensPerBundle' >> beam.ParDo(vocabulary_packing.CountBatchValues())
            .with_output_types(Any)
            | 'SumPerShard' >> beam.CombinePerKey(vocabulary_packing.SumTables())
            .with_input_types(Any).with_output_types(Any)
            | 'PerToken' >> beam.FlatMap(lambda shard_table: shard_table[1].items())
            .with_output_types(Any))


def _register(implementation):
  tft_beam_common.register_ptransform(analyzer_nodes.VocabularyAccumulate)(implementation)


# 'ours': whether this module's implementation is the one registered; 'logged': the reason why
# it does not fit was logged (once a process).
_STATE = {'ours': False, 'logged': False}


def install():
  """Makes TFT use the per-batch counting, and pack the frequency vocabularies of each phase
  into one stage (pipelines/vocabulary_packing.py), for the pipelines built after this call
  (idempotent).
  Not where the Beam patches are off (beam_patches.ENV) or where it does not fit the installed
  TF Transform (unfit_reason, logged once per process): TFT's own implementation then runs (put
  back if an earlier call had registered this one)."""
  reason = unfit_reason()
  if reason is None and beam_patches.enabled():
    _register(_BatchCountedVocabularyAccumulate)
    _STATE['ours'] = True
    analysis_graph.set_enabled(True, REWRITES, CACHE_REWRITES)
    binding_packing.install_deferred_metadata(True)
    warm_session.install(True)
    return
  analysis_graph.set_enabled(False)
  if reason is None:
    binding_packing.install_deferred_metadata(False)
    warm_session.install(False)
  if reason is not None and not _STATE['logged']:
    _STATE['logged'] = True
    _LOG.warning('TF Transform %s: its own VocabularyAccumulate runs, not pipelines/vocabulary.py '
                 '(%s)', tft.__version__, reason)
  if _STATE['ours']:  # registered by an earlier call, when it was wanted
    _register(_TFT_IMPLEMENTATION)
    _STATE['ours'] = False


@contextlib.contextmanager
def tft_implementation():
  """TFT's own implementation (its counting, one chain of stages per vocabulary) for the
  pipelines built within the block (to compare against); after it, what install() chooses."""
  if _TFT_IMPLEMENTATION is not None:
    _register(_TFT_IMPLEMENTATION)
    _STATE['ours'] = False
  analysis_graph.set_enabled(False)
  if unfit_reason() is None:
    binding_packing.install_deferred_metadata(False)
    warm_session.install(False)
  try:
    yield
  finally:
    install()
