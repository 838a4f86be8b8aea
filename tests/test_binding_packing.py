"""pipelines/binding_packing.py and merge_packing.py: the analysis graph rewrites, on TF
Transform's own traced graphs.

That the packed analysis gives TF Transform's own results (vocabulary files byte for byte, every
transformed value, means and variances, quantile buckets, vocabulary sizes bound in a second
phase, whose first phase's merges are packed) is tests/test_vocabulary.py's comparison: it runs
the rewrites against TF Transform's unpacked analysis in graph mode; the end of this file
compares a one-phase wide analysis. Here: what the rewrites pack, what they leave, and their
Beam stages on their own.
"""

import collections
import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import impl_helper
from tensorflow_transform.beam import analysis_graph_builder
from tensorflow_transform.beam import impl as tft_impl

from pipelines import analysis_graph, binding_packing, merge_packing, vocabulary
from tests import helpers

SPEC = {'a': tf.TensorSpec([None], tf.string), 'b': tf.TensorSpec([None], tf.string),
        'x': tf.TensorSpec([None], tf.float32), 'y': tf.TensorSpec([None], tf.float32)}


def _one_phase(inputs):
  return {
      'a': tft.compute_and_apply_vocabulary(inputs['a']),  # packed vocabulary
      # weighted: TF Transform's own vocabulary chain, its bindings kept
      'b': tft.compute_and_apply_vocabulary(inputs['b'], weights=inputs['y']),
      'x_z': tft.scale_to_z_score(inputs['x']),  # mean and variance: a packed combine
      'x_q': tft.bucketize(inputs['x'], 4),  # quantiles: a packed combine
      'y_01': tft.scale_to_0_1(inputs['y']),  # min and max
  }


def _two_phases(inputs):
  out = _one_phase(inputs)
  # a combine of something made from a first-phase result
  out['y_c'] = inputs['y'] - tft.mean(inputs['y'] * tft.max(inputs['x']))
  return out


def _kinds(fn, graph_mode):
  graph, inputs, outputs = impl_helper.trace_preprocessing_function(
      fn, SPEC, use_tf_compat_v1=graph_mode)
  root, _, side_effects = analysis_graph_builder.build(graph, inputs, outputs)
  ops, _ = analysis_graph.operations((root, *side_effects))
  return collections.Counter(type(op.operation_def).__name__ for op in ops.values())


@pytest.fixture
def packing():
  vocabulary.install()
  assert analysis_graph.enabled()


def test_graph_mode_binds_a_phase_in_one_step(packing):
  kinds = _kinds(_one_phase, graph_mode=True)
  # The analyzer phase's save is packed; the save of the analyzer inputs has no bindings.
  assert kinds['PackedCreateSavedModel'] == 1 and kinds['CreateSavedModel'] == 1, kinds
  assert kinds['AccumulatorsByKey'] == 1 and kinds['AddKey'] == 0, kinds
  assert kinds['ExtractPackedCombineMergeOutputs'] == 0, kinds
  assert kinds['ExtractPackedVocabulary'] == 0, kinds
  # the packed merge's and the packed vocabularies' bindings
  assert kinds['PackedTensorBindings'] == 2, kinds
  # The weighted vocabulary keeps TF Transform's chain and its bindings: path and two sizes.
  assert kinds['CreateTensorBinding'] == 3 and kinds['VocabularyOrderAndWrite'] == 1, kinds


def test_two_phases_pack_each_phases_merges_and_bindings(packing):
  # TF Transform packs the merges of a one-phase analysis only; merge_packing packs those of
  # each phase reading one packed accumulate: phase 0's five combines here. Phase 1 has a single
  # combine, which TF Transform packs neither in its accumulate nor in its merge.
  kinds = _kinds(_two_phases, graph_mode=True)
  assert kinds['PackedCombineMerge'] == 1 and kinds['CacheableCombineMerge'] == 1, kinds
  assert kinds['PackedCreateSavedModel'] == 2, kinds
  # Each phase's save binds the packed merge's and packed vocabularies' results: a list each;
  # the phase-1 mean keeps its binding, the weighted vocabulary its three.
  assert kinds['PackedTensorBindings'] == 4, kinds
  assert kinds['ExtractPackedVocabulary'] == 0 and kinds['ExtractCombineMergeOutputs'] == 1, kinds


def test_tf2_behaviours_keep_the_bindings_and_pack_the_accumulators(packing):
  kinds = _kinds(_one_phase, graph_mode=False)
  assert kinds['PackedCreateSavedModel'] == 0 and kinds['PackedTensorBindings'] == 0, kinds
  assert kinds['CreateTensorBinding'] > 3 and kinds['AccumulatorsByKey'] == 1, kinds


def test_off_it_is_tensorflow_transforms_graph():
  with vocabulary.tft_implementation():
    assert not analysis_graph.enabled()
    kinds = _kinds(_one_phase, graph_mode=True)
  assert kinds['PackedCreateSavedModel'] == 0 and kinds['AccumulatorsByKey'] == 0, kinds
  assert kinds['CreateTensorBinding'] > 3 and kinds['AddKey'] > 0, kinds


def test_the_bindings_are_tensorflow_transforms_own_values():
  merged = {'mean': (np.float32(1.5), np.float32(2.0)), 'q': (np.array([1.0, 2.0]),)}
  entries = (('mean', 2, 1, 'var:0', 1, False), ('q', 1, 0, 'q:0', 1, False))
  bindings = binding_packing.bindings_from_merge(merged, entries)
  assert bindings == [tft_impl._TensorBinding(np.float32(2.0), 'var:0', 1, False),
                      tft_impl._TensorBinding(merged['q'][0], 'q:0', 1, False)]
  pairs = [(1, (np.array(b'/v1'), np.int64(4), np.int64(3))),
           (0, (np.array(b'/v0'), np.int64(2), np.int64(2)))]
  entries = ((0, 3, 0, 'p0:0', 7, True), (1, 3, 2, 's1:0', 9, False))
  bindings = binding_packing.bindings_from_vocabularies(pairs, entries)
  assert [b.value for b in bindings] == [np.array(b'/v0'), np.int64(3)]
  assert [b.is_asset_filepath for b in bindings] == [True, False]
  assert merge_packing.accumulators_by_key({'m': 1, 'n': 2}, (('n', 'k'), ('m', 'j'))) == [
      ('k', 2), ('j', 1)]


def test_an_analyzer_with_the_wrong_number_of_outputs_is_named():
  with pytest.raises(ValueError, match='Analyzer mean has 2 outputs .* produced 1'):
    binding_packing.bindings_from_merge({'mean': (1.0,)}, (('mean', 2, 0, 't:0', 1, False),))


# ---- end to end: a one-phase wide analysis, packed and TF Transform's own ------------------

FLOATS = [f'f{i}' for i in range(12)]
STRINGS = [f's{i}' for i in range(6)]


def _wide(inputs):
  out = {}
  for i, f in enumerate(FLOATS):
    out[f'{f}_z'] = tft.scale_to_z_score(inputs[f])
    if i % 3 == 0:
      out[f'{f}_q'] = tft.bucketize(inputs[f], 5)
    if i % 4 == 1:
      out[f'{f}_01'] = tft.scale_to_0_1(inputs[f])
  for s in STRINGS:
    out[f'{s}_id'] = tft.compute_and_apply_vocabulary(inputs[s], num_oov_buckets=1,
                                                      vocab_filename=s)
  out['n_size'] = tf.fill(tf.shape(inputs['f0']),
                          tft.experimental.get_vocabulary_size_by_name('s1'))
  return out


def _analyze(root):
  spec = {f: tf.io.FixedLenFeature([], tf.float32) for f in FLOATS}
  spec.update({s: tf.io.FixedLenFeature([], tf.string) for s in STRINGS})
  rng = np.random.default_rng(5)
  rows = [{**{f: float(rng.normal(i, 1 + i)) for i, f in enumerate(FLOATS)},
           **{s: f'{s}_{int(rng.zipf(1.5)) % (10 + 7 * i)}'.encode()
              for i, s in enumerate(STRINGS)}} for _ in range(600)]
  files, out, transforms = helpers.analyze_in_graph_mode(_wide, spec, rows, root, batch_size=100)
  schema = tft.TFTransformOutput(root).transformed_metadata.schema
  deferred = glob.glob(os.path.join(root, 'tmp', '**', '*.deferred_schema.pb'), recursive=True)
  return (files, {key: np.array([row[key] for row in out]) for key in out[0]}, transforms,
          schema, deferred)


@pytest.fixture(scope='module')
def wide_runs(tmp_path_factory):
  with vocabulary.tft_implementation():
    theirs = _analyze(str(tmp_path_factory.mktemp('tft')))
  vocabulary.install()
  return theirs, _analyze(str(tmp_path_factory.mktemp('packed')))


def test_a_packed_wide_analysis_gives_tensorflow_transforms_results(wide_runs):
  (their_files, theirs, their_count, their_schema, _), (files, ours, count, schema,
                                                          deferred) = wide_runs
  assert files == their_files and len(files) == len(STRINGS)
  assert sorted(ours) == sorted(theirs)
  for key, values in theirs.items():
    # the same combiners on the same batches: the same bits
    assert ours[key].tolist() == values.tolist(), key
  # and against numpy: the z-scores' means and variances are the rows'
  assert np.abs(ours['f3_z'].mean()) < 1e-5 and abs(ours['f3_z'].std() - 1) < 1e-4
  # Per-analyzer transforms are gone: 12 means and variances, 4 quantiles, 3 min-max and 6
  # vocabularies had about three each, and one side input per binding.
  assert count < their_count - 3 * (12 + 4 + 3 + 6), (count, their_count)
  # The schema computed where the graph was bound is TF Transform's ComputeDeferredMetadata's,
  # analyzer-dependent domains included (a vocabulary's ids: its size plus the OOV bucket).
  assert len(deferred) == 1
  assert schema == their_schema
  domains = {f.name: f.int_domain for f in schema.feature if f.HasField('int_domain')}
  assert domains['s1_id'].max == len(files['s1'].splitlines()) and domains['s1_id'].min == 0
