"""trainer.export_tflite: the exported model as a TFLite model of built-in ops only, run by the
TFLite interpreter against the SavedModel it came from, and the rewrites it relies on checked
against TensorFlow's own ops."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.runs import REPO, command_env
from trainer import export_tflite, tflite_graph
from transforms.errors import UserError


def _interpreter(path=None, content=None):
  # the interpreter that ships with TensorFlow has no Flex delegate: a model that needed
  # TensorFlow ops would not run in it (ai_edge_litert, where installed, is the same runtime)
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    Interpreter = tf.lite.Interpreter
  return Interpreter(model_path=path, model_content=content)


def _raw_columns(version_dir, csv_path, limit=None):
  """Raw eval rows as the pipeline reads them (cells trimmed, NA values missing: '' for a
  variable-length string), one numpy column per predict_raw input."""
  with open(os.path.join(version_dir, 'assets.extra', 'raw_format.json')) as f:
    fmt = json.load(f)
  specs = tf.saved_model.load(version_dir).signatures['predict_raw'].structured_input_signature[1]
  rows = []
  with open(csv_path, newline='') as f:
    for cells in csv.reader(f):
      if len(cells) == len(fmt['csv_columns']):
        rows.append({c: v.strip() for c, v in zip(fmt['csv_columns'], cells)})
  rows = rows[:limit]
  columns = {}
  for name, spec in specs.items():
    values = [r[name] for r in rows]
    if spec.dtype == tf.string:
      columns[name] = np.array(['' if v in fmt['na_values'] else v for v in values], dtype=bytes)
    else:
      columns[name] = np.array([float(v) for v in values]).astype(spec.dtype.as_numpy_dtype)
  return columns


def _saved_model_outputs(version_dir, columns):
  signature = tf.saved_model.load(version_dir).signatures['predict_raw']
  return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in columns.items()})
          .items()}


@pytest.fixture(scope='module')
def census_tflite(trained, tmp_path_factory):
  base = tmp_path_factory.mktemp('tflite') / 'census'
  shutil.copytree(trained['path'], base / '1')
  path, size, signature, replaced = export_tflite.run(['--model', str(base)])
  assert signature == 'predict_raw'
  return {'version': str(base / '1'), 'path': path, 'size': size, 'replaced': replaced,
          'test_csv': trained['test_csv']}


def test_census_tflite_gives_the_saved_models_predictions(census_tflite):
  version = census_tflite['version']
  assert census_tflite['path'] == os.path.join(version, 'model.tflite')
  print(f"census model.tflite: {census_tflite['size']:,} bytes")
  assert 20_000 < census_tflite['size'] < 2_000_000
  # the vocabulary tables, the string merges and the buckets were what needed rewriting
  assert census_tflite['replaced']['InitializeTableFromTextFileV2'] == 8
  assert census_tflite['replaced']['UpperBound'] == 2
  columns = _raw_columns(version, census_tflite['test_csv'])
  assert len(columns['age']) > 1000
  want = _saved_model_outputs(version, columns)
  runner = _interpreter(census_tflite['path']).get_signature_runner('predict_raw')
  got = runner(**columns)
  assert set(got) == set(want) == {'probabilities', 'class_ids', 'classes'}
  assert np.abs(got['probabilities'] - want['probabilities']).max() <= 1e-4
  np.testing.assert_array_equal(got['class_ids'], want['class_ids'])
  np.testing.assert_array_equal(got['classes'], want['classes'])
  # the rows that take the other paths: a category never seen (OOV bucket), a missing one
  # (''), one row alone, and a batch of a different size after the first (tables filled once)
  odd = {k: v[:3].copy() for k, v in columns.items()}
  odd['workclass'][0] = b'Unheard-of'
  odd['occupation'][1] = b''
  odd['native_country'][2] = b''
  for batch in (odd, {k: v[:1] for k, v in odd.items()}):
    np.testing.assert_allclose(runner(**batch)['probabilities'],
                               _saved_model_outputs(version, batch)['probabilities'], atol=1e-4)


class _Vocabulary(tf.Module):
  """A vocabulary file's table, as TF Transform's apply_vocabulary builds one (filled from the
  file: whole lines, line numbers)."""

  def __init__(self, vocabulary_file):
    super().__init__()
    self.table = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(vocabulary_file, tf.string,
                                      tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                                      tf.lookup.TextFileIndex.LINE_NUMBER), -1)


class _Strings(_Vocabulary):
  """What the string rewrites must reproduce, as TensorFlow computes it."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='s'),
                                tf.TensorSpec([None], tf.float32, name='x')])
  def predict_raw(self, s, x):
    sparse = tf.sparse.from_dense(tf.expand_dims(s, 1))  # '' is missing
    dense = tf.sparse.to_dense(sparse, default_value='zz')  # SparseToDense with a default
    padded = tf.pad(dense, [[0, 0], [1, 1]], constant_values='b')  # PadV2
    picked = tf.where(tf.equal(s, 'c'), tf.fill(tf.shape(s), 'a'), s)  # SelectV2
    boundaries = tf.constant([[-1.0, 0.0, 2.5]])
    return {
        'dense_ids': self.table.lookup(tf.reshape(dense, [-1])),
        'padded_ids': self.table.lookup(padded),
        'picked_is_a': tf.cast(tf.equal(picked, 'a'), tf.int64),
        'upper': tf.searchsorted(boundaries, tf.reshape(x, [1, -1]), side='right'),
        'lower': tf.searchsorted(boundaries, tf.reshape(x, [1, -1]), side='left'),
    }


def _converted(module_class, words, tmp_path):
  """module_class(vocabulary file of `words`) saved with its predict_raw, then converted:
  (the SavedModel's directory, the interpreter's predict_raw runner, what was rewritten)."""
  vocabulary = tmp_path / 'vocabulary'
  vocabulary.write_text(''.join(w + '\n' for w in words))
  module = module_class(str(vocabulary))
  saved = str(tmp_path / 'saved')
  tf.saved_model.save(module, saved, signatures={'predict_raw': module.predict_raw})
  content, _, replaced = export_tflite.convert(saved)
  return saved, _interpreter(content=content).get_signature_runner('predict_raw'), replaced


def test_rewrites_match_tensorflow(tmp_path):
  saved, runner, replaced = _converted(_Strings, ['a', 'b', 'c', 'zz'], tmp_path)
  assert replaced['InitializeTableFromTextFileV2'] == 1
  cases = [
      (['a', '', 'c', 'q', 'b'], [-2.0, -1.0, 0.5, 2.5, np.nan]),
      (['', ''], [0.0, 3.0]),  # nothing but missing values: the merged strings are all defaults
      (['c'], [-1.0]),
  ]
  loaded = tf.saved_model.load(saved).signatures['predict_raw']
  for strings, numbers in cases:
    raw = {'s': np.array(strings, dtype=bytes), 'x': np.array(numbers, np.float32)}
    want = {k: v.numpy() for k, v in loaded(**{k: tf.constant(v) for k, v in raw.items()})
            .items()}
    got = runner(**raw)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'{key} on {strings}')


class _ReadingRules(_Vocabulary):
  """The export's reading rules (their name scope), then a lookup in another function, as the
  transform layer is: a missing fixed-length string becomes the default."""

  @tf.function
  def _transform(self, s):
    return self.table.lookup(s)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='s')])
  def predict_raw(self, s):
    with tf.name_scope(tflite_graph.CELL_RULES_SCOPE):
      s = tf.strings.strip(s)
      s = tf.where(tf.not_equal(s, '?'), s, tf.constant('b'))
    return {'ids': self._transform(s)}


def test_reading_rules_are_the_callers(tmp_path):
  """TFLite takes values as the pipeline reads them (trimmed, NA as the default): the export's
  own trim and NA rule pass values through, and what follows is TensorFlow's result."""
  saved, runner, replaced = _converted(_ReadingRules, ['a', 'b', 'c'], tmp_path)
  assert replaced['StringStrip of the reading rules'] == 1
  assert replaced['SelectV2 of the reading rules'] == 1
  read = np.array([b'c', b'b', b'zz', b'a'], dtype=bytes)  # '?' read as its default, 'b'
  want = tf.saved_model.load(saved).signatures['predict_raw'](
      s=tf.constant([' c', '?', 'zz ', 'a']))['ids'].numpy()
  np.testing.assert_array_equal(runner(s=read)['ids'], want)


def test_image_model_tflite_takes_pixels(tmp_path):
  """An image model's TFLite model takes the decoded pixels (TFLite cannot decode): given PIL's
  decoding of the eval PNGs it answers what the SavedModel answers to the PNG bytes."""
  from PIL import Image

  from pipelines import images
  from trainer import task
  sample = REPO / 'data' / 'fashion_mnist' / 'sample'
  train = tmp_path / 'train'
  for folder in sorted((sample / 'train').iterdir()):
    (train / folder.name).mkdir(parents=True)
    for png in sorted(folder.glob('*.png'))[:12]:
      shutil.copy(png, train / folder.name / png.name)
  images.run(['--train', str(train), '--eval', str(sample / 'test'), '--output',
              str(tmp_path / 'out')])
  version, _, _ = task.run(['--transformed', str(tmp_path / 'out'), '--model-dir',
                            str(tmp_path / 'models'), '--model-name', 'fm', '--max-steps', '10',
                            '--batch-size', '32'])
  path, size, signature, _ = export_tflite.run(['--model', version])
  assert signature == 'predict_pixels' and path == os.path.join(version, 'model.tflite')
  print(f'image model.tflite: {size:,} bytes')
  pngs = sorted(sample.glob('test/*/*.png'))
  assert len(pngs) == 200
  encoded = [p.read_bytes() for p in pngs]
  pixels = np.stack([np.asarray(Image.open(p), dtype=np.uint8)[..., None] for p in pngs])
  want = tf.saved_model.load(version).signatures['predict_images'](
      image_bytes=tf.constant(encoded))
  runner = _interpreter(path).get_signature_runner('predict_pixels')
  got = runner(pixels=pixels)
  assert np.abs(got['probabilities'] - want['probabilities'].numpy()).max() <= 1e-4
  np.testing.assert_array_equal(got['class_ids'], want['class_ids'].numpy())
  np.testing.assert_array_equal(got['classes'], want['classes'].numpy())
  one = runner(pixels=pixels[:1])
  np.testing.assert_allclose(one['probabilities'], want['probabilities'].numpy()[:1], atol=1e-4)


def test_ops_without_builtins_are_refused_in_one_line(tmp_path):
  class Decodes(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image')])
    def predict_raw(self, image):
      pixels = tf.map_fn(lambda b: tf.reshape(tf.io.decode_png(b, channels=1), [28, 28, 1]),
                         image, fn_output_signature=tf.TensorSpec([28, 28, 1], tf.uint8))
      return {'mean': tf.reduce_mean(tf.cast(pixels, tf.float32), [1, 2, 3])}

  module = Decodes()
  saved = tmp_path / 'decodes' / '1'
  tf.saved_model.save(module, str(saved), signatures={'predict_raw': module.predict_raw})
  with pytest.raises(UserError, match=r'needs the TensorFlow op\(s\) DecodePng'):
    export_tflite.convert(str(saved))
  # the command: one line on stderr, exit 2, nothing written
  done = subprocess.run([sys.executable, '-m', 'trainer.export_tflite', '--model',
                         str(saved.parent)], cwd=REPO, env=command_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'DecodePng' in lines[0], lines
  assert not (saved / 'model.tflite').exists()
  assert [p for p in os.listdir(saved) if 'tflite' in p] == []


def test_a_trim_of_the_preprocessing_fn_is_refused(tmp_path):
  # only the export's own reading rules (tflite_graph.CELL_RULES_SCOPE) may drop their trims
  class Trims(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='s')])
    def predict_raw(self, s):
      return {'n': tf.strings.length(tf.strings.strip(s))}

  module = Trims()
  tf.saved_model.save(module, str(tmp_path / 't'), signatures={'predict_raw': module.predict_raw})
  with pytest.raises(UserError, match='StringStrip'):
    export_tflite.convert(str(tmp_path / 't'))
