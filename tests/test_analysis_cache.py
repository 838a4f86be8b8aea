"""--analysis-cache: real pipeline runs over spans of the Adult sample (cold, warm with a new
span, an uncached run to compare with, a corrupt cache), and the cache's plan for every cause of
a miss, through the same launch code as the command (tabular.inspect_inputs, job.plan_cache)."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow_transform as tft
from tensorflow_transform.beam import analysis_graph_builder
from tfx_bsl.tfxio import tensor_adapter

from pipelines import analysis_cache, analysis_graph, job, output_dir, tabular, vocabulary
from tests.conftest import REPO
from tests.helpers import read_split
from transforms import contract as contract_lib
from transforms import run_contract

SPANS = 4

# A census variant: the same contract, one more feature whose analyzer's input is `age + 1`.
SHIFTED = '''
import tensorflow as tf
import tensorflow_transform as tft
from transforms.census import *  # noqa: F401,F403 (the contract)
from transforms import census


def preprocessing_fn(inputs):
  outputs = census.preprocessing_fn(inputs)
  outputs['age_shifted_xf'] = tft.scale_to_z_score(tf.cast(inputs['age'], tf.float32) {op} 1.0)
  return outputs
'''
# Two phases: the second analyzer reads the first one's result, so TF Transform cannot cache it.
TWO_PHASES = '''
import tensorflow as tf
import tensorflow_transform as tft
from transforms.census import *  # noqa: F401,F403 (the contract)
from transforms import census


def preprocessing_fn(inputs):
  outputs = census.preprocessing_fn(inputs)
  age = tf.cast(inputs['age'], tf.float32)
  outputs['age_centered_max_xf'] = age - tft.mean(age) + tft.max(age - tft.mean(age))
  return outputs
'''


def _write_module(directory, name, text):
  path = os.path.join(directory, f'{name}.py')
  with open(path, 'w') as f:
    f.write(text)
  return path


@pytest.fixture(scope='module')
def spans(adult_sample, tmp_path_factory):
  root = tmp_path_factory.mktemp('spans')
  lines = adult_sample[0].read_bytes().splitlines(keepends=True)
  paths = []
  for i in range(SPANS):
    path = root / f'day{i}.csv'
    path.write_bytes(b''.join(lines[i * len(lines) // SPANS:(i + 1) * len(lines) // SPANS]))
    paths.append(str(path))
  return root, paths


def _run(output, train, cache=None, transforms='transforms.census', extra=()):
  argv = ['--transforms', transforms, '--train', *train, '--output', str(output), *extra]
  if cache:
    argv += ['--analysis-cache', str(cache)]
  return tabular.run(argv)


@pytest.fixture(scope='module')
def runs(spans, tmp_path_factory):
  """A cold run over three spans, a warm one with a fourth, the same four uncached."""
  root, paths = spans
  work = tmp_path_factory.mktemp('cache_runs')
  cache = work / 'cache'
  cold = _run(work / 'cold', paths[:3], cache)
  warm = _run(work / 'warm', paths, cache)
  uncached = _run(work / 'uncached', paths)
  return {'work': work, 'cache': cache, 'paths': paths, 'cold': cold, 'warm': warm,
          'uncached': uncached}


def _from_cache(manifest):
  return [s['from_cache'] for s in manifest.analysis_cache['spans']]


def _assert_same_results(a, b):
  """Vocabulary files byte for byte; every transformed value (floats within 1e-6 relative)."""
  assets_a, assets_b = (os.path.join(d, 'transform_fn', 'assets') for d in (a, b))
  assert sorted(os.listdir(assets_a)) == sorted(os.listdir(assets_b))
  for name in os.listdir(assets_a):
    with open(os.path.join(assets_a, name), 'rb') as fa, \
        open(os.path.join(assets_b, name), 'rb') as fb:
      assert fa.read() == fb.read(), name
  rows_a, rows_b = read_split(str(a), "train"), read_split(str(b), "train")
  assert sorted(rows_a) == sorted(rows_b)
  for key in rows_a:
    if rows_a[key].dtype.kind == 'f':
      np.testing.assert_allclose(rows_a[key], rows_b[key], rtol=1e-6, atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(rows_a[key], rows_b[key], err_msg=key)


def test_cold_run_writes_a_checked_entry_per_span(runs):
  assert _from_cache(runs['cold']) == [False] * 3
  entries = [s['key'] for s in runs['cold'].analysis_cache['spans']]
  assert len(set(entries)) == 3 and all(e.startswith('span-') for e in entries)
  for entry in entries:
    checksums = json.load(open(runs['cache'] / entry / analysis_cache.CHECKSUMS))
    assert checksums['span'] in runs['paths'][:3]
    assert 'MANIFEST' in checksums['files']


def test_warm_run_analyzes_only_the_new_span_and_equals_an_uncached_run(runs):
  spans = runs['warm'].analysis_cache['spans']
  assert [s['from_cache'] for s in spans] == [True, True, True, False]
  assert [s['read'] for s in spans] == [False, False, False, True]  # census caches fully
  assert runs['uncached'].analysis_cache is None
  _assert_same_results(runs['work'] / 'warm', runs['work'] / 'uncached')
  # The statistics cover all four spans, not only the one read (numpy on the output).
  rows = read_split(str(runs["work"] / "warm"), "train")
  assert len(rows['age_xf']) == 3000
  assert abs(rows['age_xf'].mean()) < 1e-4 and abs(rows['age_xf'].std() - 1) < 1e-3
  assert len(os.listdir(runs['cache'])) == 4


def test_with_the_patches_off_tf_transform_decodes_the_cache_as_released(runs, tmp_path,
                                                                          monkeypatch):
  """Where this project's rewrites are off, the cache's read hands TF Transform one record an
  element, as its own DecodeCache takes them: every span from the cache, the same results."""
  from pipelines.runner import beam_patches
  monkeypatch.setenv(beam_patches.ENV, 'off')
  cache = tmp_path / 'cache'
  shutil.copytree(runs['cache'], cache)
  manifest = _run(tmp_path / 'out', runs['paths'], cache)
  assert not analysis_graph.cache_rewrites_enabled()  # what the run's analysis was built with
  assert _from_cache(manifest) == [True] * 4
  _assert_same_results(tmp_path / 'out', runs['work'] / 'uncached')


def test_a_corrupt_or_half_written_entry_is_a_miss_with_a_warning(runs, tmp_path, caplog):
  cache = tmp_path / 'cache'
  shutil.copytree(runs['cache'], cache)
  keys = {s['input']: s['key'] for s in runs['warm'].analysis_cache['spans']}
  first, second = (cache / keys[p] for p in runs['paths'][:2])
  victim = sorted(f for f in os.listdir(first) if f.endswith('.gz'))[0]
  with open(first / victim, 'r+b') as f:  # a cache file cut short
    f.truncate(os.path.getsize(first / victim) // 2)
  os.remove(second / analysis_cache.CHECKSUMS)  # as a copy stopped halfway leaves it
  with caplog.at_level(logging.WARNING, logger='pipelines'):
    manifest = _run(tmp_path / 'out', runs['paths'], cache)
  assert _from_cache(manifest) == [False, False, True, True]
  warnings = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert 'does not match its checksum' in warnings and 'is incomplete' in warnings
  _assert_same_results(tmp_path / 'out', runs['work'] / 'uncached')
  # Both were analyzed again and are whole again.
  assert analysis_cache.cached_entries(str(first)) is not None
  assert analysis_cache.cached_entries(str(second)) is not None


def _plan(tmp_path, train, cache, transforms='transforms.census', extra=()):
  """The cache's plan, as `python -m pipelines.tabular` makes it before it builds the job."""
  args, _ = tabular.parse_args(['--transforms', transforms, '--train', *train, '--output',
                                str(tmp_path / 'plan_out'), '--analysis-cache', str(cache),
                                *extra])
  inputs = tabular.inspect_inputs(args)
  out = output_dir.OutputDir(args.output, overwrite=True)
  return job.plan_cache(inputs.cache, out, inputs.contract.preprocessing_fn,
                        inputs.adapter_config, graph_mode=args.tracing == 'graph')


def _cached(plan):
  return [s.name in plan.cached for s in plan.spans]


def test_the_same_inputs_hit(runs, tmp_path):
  plan = _plan(tmp_path, runs['paths'], runs['cache'])
  assert _cached(plan) == [True] * 4 and not plan.to_read


def test_a_changed_file_misses_a_renamed_one_hits(runs, tmp_path):
  renamed = tmp_path / 'renamed.csv'
  shutil.copy(runs['paths'][0], renamed)
  changed = tmp_path / 'day0.csv'
  text = open(runs['paths'][0]).read()
  changed.write_text(text.replace(', 40,', ', 41,', 1))
  assert changed.read_text() != text
  plan = _plan(tmp_path, [str(renamed), str(changed)], runs['cache'])
  assert _cached(plan) == [True, False]
  assert plan.to_read == {str(changed)}


def test_a_changed_preprocessing_fn_misses_where_tft_keys_would_not(runs, tmp_path):
  plus = _write_module(tmp_path, 'plus', SHIFTED.format(op='+'))
  minus = _write_module(tmp_path, 'minus', SHIFTED.format(op='-'))
  cache = tmp_path / 'cache'
  shutil.copytree(runs['cache'], cache)
  plan_plus = _plan(tmp_path, runs['paths'][:1], cache, plus)
  assert _cached(plan_plus) == [False]  # another function than census's
  # Pretend `plus` has been analyzed: its entry in DIR, under its own key.
  src = cache / runs['warm'].analysis_cache['spans'][0]['key']
  shutil.copytree(src, cache / plan_plus.keys[runs['paths'][0]].key)
  assert _cached(_plan(tmp_path, runs['paths'][:1], cache, plus)) == [True]
  assert _cached(_plan(tmp_path, runs['paths'][:1], cache, minus)) == [False]
  # TF Transform's own cache entry keys describe `age + 1` and `age - 1` alike.
  def entry_keys(module):
    fn, specs = _fn_and_specs(module, runs['paths'][0])
    return analysis_graph_builder.get_analysis_cache_entry_keys(
        fn, specs, [tft.beam.analyzer_cache.DatasetKey('a')], True)
  assert entry_keys(plus) == entry_keys(minus)


def _fn_and_specs(module, train):
  """The module's preprocessing_fn and the type specs of its inputs, as a run over `train`."""
  specs = tensor_adapter.TensorAdapter(
      tabular.inspect_inputs(tabular.parse_args(
          ['--transforms', module, '--train', train, '--output', 'x'])[0])
      .adapter_config).OriginalTypeSpecs()
  return contract_lib.load(module).preprocessing_fn, specs


COUNTED = '''
from transforms.census import *  # noqa: F401,F403 (the contract)
from transforms import census



def preprocessing_fn(inputs):
  with open({calls!r}, 'a') as f:  # a file: the test loads the module apart from the run
    f.write('traced\\n')
  return census.preprocessing_fn(inputs)
'''


def test_the_plan_traces_the_function_once_and_plans_as_two_traces_would(runs, tmp_path,
                                                                         monkeypatch):
  """The digest's trace is handed to TF Transform's inspection of which spans to read and to its
  analysis, which otherwise trace again: the same plan (a new span is read, the cached ones
  are not), the same results."""
  calls = tmp_path / 'calls'
  module = _write_module(tmp_path, 'counted', COUNTED.format(calls=str(calls)))
  cache = tmp_path / 'cache'
  shutil.copytree(runs['cache'], cache)
  new = tmp_path / 'new.csv'
  text = open(runs['paths'][0]).read()
  new.write_text(text.replace(', 40,', ', 42,', 1))
  paths = [runs['paths'][0], str(new)]
  once = _plan(tmp_path, paths, cache, module)
  assert calls.read_text().count('traced') == 1
  # TF Transform's inspection left the trace as a fresh one is (its graph and collections, the
  # analyzers' tensors to replace among them), for the analysis to use.
  fresh = analysis_cache.trace(*_fn_and_specs('transforms.census', paths[0]), True)[0]
  used = once.traced[0]
  assert analysis_cache.digest_of(used) == analysis_cache.digest_of(fresh)
  assert {k: len(used.get_collection(k)) for k in used.get_all_collection_keys()} == {
      k: len(fresh.get_collection(k)) for k in fresh.get_all_collection_keys()}
  assert used.get_collection('tft_tensor_replacements')
  calls.unlink()
  monkeypatch.setattr(vocabulary, 'TESTED_TFT', ())  # another TF Transform: traced twice
  twice = _plan(tmp_path, paths, cache, module)
  assert calls.read_text().count('traced') == 2
  assert once.to_read == twice.to_read == {str(new)} and once.keys == twice.keys
  assert once.cached.keys() == twice.cached.keys()
  monkeypatch.undo()
  # A whole cached run traces once: the plan's trace serves the analysis too; its results are
  # an uncached run's (over the same spans, traced as usual).
  calls.unlink()
  _run(tmp_path / 'counted_run', paths, cache, transforms=module)
  assert calls.read_text().count('traced') == 1
  _run(tmp_path / 'counted_uncached', paths, transforms='transforms.census')
  _assert_same_results(tmp_path / 'counted_run', tmp_path / 'counted_uncached')


def test_a_changed_contract_reader_flag_tracing_or_version_misses(runs, tmp_path, monkeypatch):
  paths, cache = runs['paths'][:1], runs['cache']
  contract = _write_module(tmp_path, 'other_na', 'from transforms.census import *  # noqa\n'
                           "NA_VALUES = ('?', 'NA')\n")
  assert _cached(_plan(tmp_path, paths, cache, contract)) == [False]
  for flags in (['--rows-per-batch', '1000'], ['--eval-fraction', '0.1'], ['--tracing', 'tf2']):
    assert _cached(_plan(tmp_path, paths, cache, extra=flags)) == [False], flags
  versions = output_dir.package_versions()
  monkeypatch.setattr(output_dir, 'package_versions',
                      lambda: {**versions, 'tensorflow-transform': '9.9.9'})
  assert _cached(_plan(tmp_path, paths, cache)) == [False]


def test_an_analysis_that_cannot_be_cached_reads_every_span(spans, tmp_path):
  """An analyzer of another's result: cached spans are read again, and the result equals an
  uncached run's."""
  _, paths = spans
  module = _write_module(tmp_path, 'two_phases', TWO_PHASES)
  cache = tmp_path / 'cache'
  _run(tmp_path / 'cold', paths[:2], cache, module)
  warm = _run(tmp_path / 'warm', paths[:3], cache, module)
  assert [(s['from_cache'], s['read']) for s in warm.analysis_cache['spans']] == [
      (True, True), (True, True), (False, True)]
  _run(tmp_path / 'uncached', paths[:3], None, module)
  _assert_same_results(tmp_path / 'warm', tmp_path / 'uncached')
  manifest = run_contract.read_manifest(str(tmp_path / 'warm'))
  assert manifest.analysis_cache['directory'] == str(cache)


def test_the_flag_is_in_the_help():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'pipelines.tabular', '--help'], cwd=REPO,
                       capture_output=True, text=True).stdout
  assert '--analysis-cache DIR' in out


def test_image_spans(tmp_path):
  """pipelines.images: a class-folder root is one span; a second root added to a cached one."""
  import shutil as _shutil

  from pipelines import images
  sample = REPO / 'data' / 'fashion_mnist' / 'sample' / 'train'
  roots = []
  for i in range(2):
    root = tmp_path / f'day{i}'
    for label in sorted(os.listdir(sample)):
      (root / label).mkdir(parents=True)
      for png in sorted((sample / label).glob('*.png'))[i * 20:(i + 1) * 20]:
        _shutil.copy(png, root / label / png.name)
    roots.append(str(root))
  cache = tmp_path / 'cache'

  def run(name, train, with_cache=True):
    argv = ['--train', *train, '--output', str(tmp_path / name), '--image-size', '28', '28',
            '--channels', '1']
    return images.run(argv + (['--analysis-cache', str(cache)] if with_cache else []))

  assert _from_cache(run('cold', roots[:1])) == [False]
  warm = run('warm', roots)
  assert [s['input'] for s in warm.analysis_cache['spans']] == roots
  assert _from_cache(warm) == [True, False]
  run('uncached', roots, with_cache=False)
  _assert_same_results(tmp_path / 'warm', tmp_path / 'uncached')


MAPPED = '''
import tensorflow as tf
import tensorflow_transform as tft
from transforms.census import *  # noqa: F401,F403 (the contract)
from transforms import census


def preprocessing_fn(inputs):
  outputs = census.preprocessing_fn(inputs)
  age = tf.cast(inputs['age'], tf.float32)
  outputs['age_mapped_xf'] = tft.scale_to_z_score(tf.map_fn(lambda a: a + {c}, age))
  return outputs
'''


def test_the_graph_digest_sees_function_bodies_and_not_their_names(runs, tmp_path):
  """tf.map_fn's body is a function TF names with a counter of the process: two traces of one
  preprocessing_fn have one digest; another constant inside the body, another digest."""
  def digest(module):
    return analysis_cache.digest_of(
        analysis_cache.trace(*_fn_and_specs(module, runs['paths'][0]), True)[0])
  one = _write_module(tmp_path, 'mapped_one', MAPPED.format(c='1.0'))
  two = _write_module(tmp_path, 'mapped_two', MAPPED.format(c='2.0'))
  assert digest(one) == digest(one)
  assert digest(one) != digest(two)
