"""The TF.js export (python -m trainer.export_tfjs) as a user runs it, and the exported graph model
run in Node by tfjs/predict.mjs (@tensorflow/tfjs, pure JavaScript): the census model's raw test
rows give the SavedModel's predict_raw outputs; an image model's decoded pixels give what the
SavedModel answers to the encoded images; a missing converter environment is one line.

Needs `make tfjs` (the converter's venv .tfjs-env and tfjs/node_modules): without them these tests
fail, saying so."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from trainer import export_tfjs, tfjs_graph

CENSUS_COLUMNS = ('age', 'workclass', 'fnlwgt', 'education', 'education_num', 'marital_status',
                  'occupation', 'relationship', 'race', 'sex', 'capital_gain', 'capital_loss',
                  'hours_per_week', 'native_country')
PREDICT = REPO / 'tfjs' / 'predict.mjs'


@pytest.fixture(scope='module')
def tools():
  """The converter environment and the Node runtime that `make tfjs` installs."""
  env = os.environ.get(export_tfjs.ENV_VARIABLE) or export_tfjs.DEFAULT_ENV
  lacking = [what for what, path in (
      ('the converter venv', os.path.join(env, 'bin', 'tensorflowjs_converter')),
      ('the Node runtime', REPO / 'tfjs' / 'node_modules' / '@tensorflow' / 'tfjs'))
      if not os.path.exists(path)]
  if shutil.which('node') is None:
    lacking.append('node')
  if lacking:
    pytest.fail(f'the TF.js tools are not built ({", ".join(lacking)} missing): run `make tfjs`',
                pytrace=False)
  return env


def _command(*args, **env):
  return subprocess.run([sys.executable, '-m', 'trainer.export_tfjs', *map(str, args)], cwd=REPO,
                        env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)


def _node(model_dir, request):
  return subprocess.run(['node', str(PREDICT), str(model_dir)], input=json.dumps(request),
                        capture_output=True, text=True, timeout=120)


def _one_line(stderr):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr
  return lines[0]


def _staged(directory):
  return [n for n in os.listdir(directory) if n.startswith(export_tfjs.STAGING)]


def _census_rows(test_csv):
  """Raw test rows as a JSON client has them, cells as the file holds them (a leading space,
  '?' for unknown), and a few of our own: words no vocabulary has, other whitespace around a
  word (a no-break space is not whitespace to TensorFlow's strip), '' (missing)."""
  with open(test_csv, newline='') as f:
    lines = [r for r in csv.reader(f) if len(r) == 15]
  rows = [{k: int(v) if k in ('age', 'fnlwgt', 'education_num', 'capital_gain', 'capital_loss',
                              'hours_per_week') else v
           for k, v in zip(CENSUS_COLUMNS, line)} for line in lines]
  first = rows[0]
  rows += [dict(first, workclass='Martian', native_country='Atlantis', age=0),
           dict(first, workclass='\tPrivate \r\n', occupation='\v Sales\f'),
           dict(first, workclass='Private\u00a0', education='', race=''),
           dict(first, capital_gain=99999, hours_per_week=99, fnlwgt=2_000_000)]
  return rows


@pytest.fixture(scope='module')
def census(tools, trained, tmp_path_factory):
  """The trained census version copied to a model base of its own, exported to TF.js by the
  command over a leftover staging directory and an older tfjs/ that it must replace."""
  base = tmp_path_factory.mktemp('tfjs') / 'census'
  version = base / '1'
  shutil.copytree(trained['path'], version)
  (version / f'{export_tfjs.STAGING}dead0000').mkdir()  # a killed export's
  (version / 'tfjs').mkdir()
  (version / 'tfjs' / 'model.json').write_text('{"an older": "export"}')
  done = _command('--model', base)
  assert done.returncode == 0, done.stderr
  return {'base': base, 'version': version, 'stdout': done.stdout, 'env': tools,
          'rows': _census_rows(trained['test_csv'])}


def test_the_census_model_runs_in_node_as_the_savedmodel(census):
  version, rows = census['version'], census['rows']
  assert f'wrote {version / "tfjs"}:' in census['stdout']
  # The leftover staging directory is gone, the older export replaced.
  assert 'tfjs' in os.listdir(version) and _staged(version) == []
  files = sorted(os.listdir(version / 'tfjs'))
  assert files == ['group1-shard1of1.bin', 'model.json']
  sizes = {f: os.path.getsize(version / 'tfjs' / f) for f in files}
  print(f'TF.js census model: {sizes}, {sum(sizes.values()):,} bytes in all')
  assert sum(sizes.values()) < 4 << 20
  model_json = json.loads((version / 'tfjs' / 'model.json').read_text())
  initializer = [n['op'] for n in model_json['modelInitializer']['node']]
  assert initializer.count('HashTableV2') == initializer.count('LookupTableImportV2') == 8
  nodes = export_tfjs.model_json_nodes(model_json)
  ops = {n['op'] for n in nodes}
  assert {'LookupTableFindV2', 'StaticRegexReplace', 'UpperBound'} <= ops
  assert not ops & {'StringStrip', 'InitializeTableFromTextFileV2'}
  assert tfjs_graph.unsupported(nodes, export_tfjs.runtime_ops(census['env'])) == []

  done = _node(version / 'tfjs', {'instances': rows})
  assert done.returncode == 0, done.stderr
  assert done.stderr == ''
  got = json.loads(done.stdout)['predictions']
  assert len(got) == len(rows) > 1000

  signature = tf.saved_model.load(str(version)).signatures['predict_raw']
  types = {k: s.dtype for k, s in signature.structured_input_signature[1].items()}
  expected = signature(**{k: tf.constant([r[k] for r in rows], types[k]) for k in types})
  diff = np.abs(np.array([p['probabilities'] for p in got]) -
                expected['probabilities'].numpy()).max()
  print(f'TF.js vs SavedModel on {len(rows)} rows: max abs diff of probabilities {diff:.3g}')
  assert diff <= 1e-4
  assert [p['class_ids'] for p in got] == expected['class_ids'].numpy().tolist()
  assert [p['classes'] for p in got] == [c.decode() for c in expected['classes'].numpy()]

  # Columns in, columns out, as TF Serving's "inputs" form.
  columns = {k: [r[k] for r in rows[-6:]] for k in CENSUS_COLUMNS}
  done = _node(census['base'] / '1', {'inputs': columns})  # the version directory works too
  assert done.returncode == 0, done.stderr
  outputs = json.loads(done.stdout)['outputs']
  assert sorted(outputs) == ['class_ids', 'classes', 'probabilities']
  np.testing.assert_allclose(outputs['probabilities'], expected['probabilities'].numpy()[-6:],
                             atol=1e-4)


def test_bad_requests_are_one_line(census):
  row = dict(census['rows'][0])
  del row['age']
  for request, message in (
      ({'instances': [row]}, "instance 0: no value for 'age'"),
      ({'instances': [dict(row, age=1 << 40)]}, 'outside the int32 range'),
      ({'instances': [dict(row, age=39, workclass=7)]}, "'workclass' takes a string"),
      ({'rows': []}, 'neither {"instances"'),
  ):
    done = _node(census['version'], request)
    assert done.returncode == 2 and done.stdout == ''
    assert message in _one_line(done.stderr), done.stderr


def test_the_export_refuses_in_one_line(census, tmp_path):
  missing = tmp_path / 'no-env'
  for args, env in ((['--converter-env', missing], {}), ([], {'TFJS_CONVERTER_ENV': str(missing)})):
    done = _command('--model', census['base'], *args, **env)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert line == (f'error: no TF.js converter in {missing} (bin/tensorflowjs_converter): run '
                    '`make tfjs` to build it, or point --converter-env or TFJS_CONVERTER_ENV at '
                    'one'), line
  done = _command('--model', census['base'], '--version', 7)
  assert done.returncode == 2 and 'has no version 7' in _one_line(done.stderr)
  # --output never replaces a directory of other files.
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  done = _command('--model', census['base'], '--output', tmp_path / 'mine')
  assert done.returncode == 2
  assert 'holds files other than a TF.js model' in _one_line(done.stderr)
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'


def test_an_image_model_runs_in_node_on_pixels(tools, tmp_path):
  """The image transform decodes and resizes inside the graph, which TF.js cannot: the export
  takes the decoded pixels instead (trainer/pixel_graph.py). PIL's decoding of the sample's test
  PNGs, sent to Node, gives what the SavedModel answers to the PNG bytes."""
  from PIL import Image

  from tests.test_images import SAMPLE, copy_tree, run, sample_files
  from trainer import train
  copy_tree(sample_files('train', 3), tmp_path / 'train')
  run('--train', tmp_path / 'train', '--output', tmp_path / 'out', '--image-size', 28, 28,
      '--channels', 1)
  path, _, _ = train.train_and_export(train.TrainConfig(
      transformed_dir=str(tmp_path / 'out'), model_dir=str(tmp_path / 'models'), epochs=1,
      max_steps=2, batch_size=16))
  done = _command('--model', os.path.dirname(path))
  assert done.returncode == 0, done.stderr
  assert _staged(path) == []
  pngs = sorted(SAMPLE.glob('test/*/*.png'))[:40]
  pixels = [np.asarray(Image.open(p), dtype=np.uint8)[..., None].tolist() for p in pngs]
  done = _node(os.path.join(path, 'tfjs'), {'instances': [{'pixels': p} for p in pixels]})
  assert done.returncode == 0 and done.stderr == '', done.stderr
  got = json.loads(done.stdout)['predictions']
  want = tf.saved_model.load(path).signatures['predict_images'](
      image_bytes=tf.constant([p.read_bytes() for p in pngs]))
  assert np.abs(np.array([g['probabilities'] for g in got])
                - want['probabilities'].numpy()).max() <= 1e-4
  assert [g['class_ids'] for g in got] == want['class_ids'].numpy().tolist()
  assert [g['classes'] for g in got] == [c.decode() for c in want['classes'].numpy()]
  # pixels of another size are one line, before the model runs
  done = _node(os.path.join(path, 'tfjs'), {'instances': [{'pixels': [[[0]] * 27] * 28}]})
  assert done.returncode == 2
  assert "'pixels' takes nested arrays of 28 x 28 x 1 values" in _one_line(done.stderr)


def _drop(sparse, value):
  return tf.sparse.retain(sparse, tf.not_equal(sparse.values, value))


class _StringOps(tf.Module):
  """A predict_raw of the string ops that tfjs_graph rewrites, at their edges."""

  @tf.function(input_signature=[{'text': tf.TensorSpec([None], tf.string, name='text'),
                                 'n': tf.TensorSpec([None], tf.int64, name='n')}])
  def predict_raw(self, columns):
    text, n = columns['text'], columns['n']
    column = tf.reshape(text, [-1, 1])
    return {
        'stripped': tf.strings.strip(text),
        'empty': tf.equal(text, tf.zeros_like(text)),
        'padded': tf.pad(column, [[1, 0], [0, 2]]),
        'padded_z': tf.pad(column, [[0, 1], [1, 0]], constant_values='z'),
        'gathered': tf.gather(tf.constant([['a', 'A'], ['b', 'B'], ['c', 'C']]), n % 3),
        'kept': tf.sparse.to_dense(_drop(tf.sparse.from_dense(column), 'ab'), default_value='-'),
    }


def test_the_string_rewrites_run_in_node_as_in_tensorflow(tools, tmp_path):
  """Each rewrite of trainer/tfjs_graph.py, exported and run in Node, against TensorFlow."""
  module = _StringOps()
  tf.saved_model.save(module, str(tmp_path / 'strings' / '1'),
                      signatures={'predict_raw': module.predict_raw})
  done = _command('--model', tmp_path / 'strings')
  assert done.returncode == 0, done.stderr
  rewritten = done.stdout.split('ops rewritten for TF.js: ')[1].splitlines()[0].split(', ')
  assert {r.split(' x')[0] for r in rewritten} == {'GatherV2', 'Pad', 'PadV2', 'StringStrip',
                                                    'ZerosLike'}, done.stdout
  texts = ['', ' x ', '\t\n\v\f\r word \r\n', '   ', 'a\u00a0', 'in side', '\u00e9t\u00e9 ', 'ab']
  columns = {'text': texts, 'n': [0, 1, 2, 3, 4, 5, 7, 8]}
  expected = module.predict_raw({'text': tf.constant(texts), 'n': tf.constant(columns['n'],
                                                                              tf.int64)})
  done = _node(tmp_path / 'strings' / '1', {'inputs': columns})
  assert done.returncode == 0, done.stderr
  got = json.loads(done.stdout)['outputs']
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    value = value.numpy()
    if value.dtype == object:
      value = np.vectorize(lambda b: b.decode())(value)
    assert got[name] == value.tolist(), name


def test_the_export_imports_no_beam():
  code = ('import sys; from trainer import export_tfjs, tfjs_graph; '
          "print('beam' if 'apache_beam' in sys.modules else 'no beam')")
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.stdout.strip() == 'no beam', done.stderr
