"""Malformed rows are dead-lettered with file, line and reason; user errors are one clear line."""

import gzip
import json
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from pipelines import images, tabular
from pipelines.sources import csv_chunks, csv_files, csv_layout, csv_rows
from tests.conftest import ADULT_TRAIN, REPO, head_lines
from tests.helpers import read_split
from transforms import census
from transforms import contract as contract_lib
from transforms.errors import UserError

GOOD = [line for line in head_lines(ADULT_TRAIN, 60)]


def _bad_adult_csv(path):
  """60 real Adult rows, some broken on purpose; returns {line number: kind} of the bad ones."""
  lines = list(GOOD)
  bad = {}

  def corrupt(i, line, kind):
    lines[i] = line
    bad[i + 1] = kind

  corrupt(4, b'39, State-gov, 77516, Bachelors, 13\n', 'field_count')
  corrupt(9, GOOD[9].replace(GOOD[9].split(b',')[0], b'thirty', 1), 'bad_number')
  corrupt(14, GOOD[14].replace(b'Private', b'Priv\xff\xfeate'), 'bad_encoding')
  corrupt(19, b',' + GOOD[19].split(b',', 1)[1], 'missing_value')  # empty age, no default
  corrupt(24, GOOD[24].replace(GOOD[24].split(b',')[2], b' 1e400', 1), 'bad_number')
  corrupt(29, GOOD[29].replace(GOOD[29].split(b',')[0], b'nan', 1), 'bad_number')
  lines.insert(40, b'\n')  # a blank line is not a row: later line numbers shift by one
  bad = {(k if k <= 40 else k + 1): v for k, v in bad.items()}
  path.write_bytes(b''.join(lines))
  return bad


def test_malformed_rows_are_dead_lettered(tmp_path, capsys):
  csv_path = tmp_path / 'dirty.csv'
  bad = _bad_adult_csv(csv_path)
  out = tmp_path / 'out'
  manifest = tabular.run(['--transforms', 'transforms.census', '--train', str(csv_path),
                          '--output', str(out), '--max-bad-rows', '10'])
  summary = capsys.readouterr().out
  counts = manifest.splits['train']
  assert counts.rows_read == 60
  assert counts.rows_rejected == len(bad) == 6
  assert counts.rows_written == 60 - 6
  assert counts.rows_read == counts.rows_written + counts.rows_rejected
  errors = [json.loads(line) for line in open(out / 'errors' / 'train.jsonl')]
  assert {e['line']: e['kind'] for e in errors} == bad
  for e in errors:
    assert e['file'] == str(csv_path) and e['reason'] and e['raw']
  by_line = {e['line']: e for e in errors}
  assert 'thirty' in by_line[10]['reason'] and "'age'" in by_line[10]['reason']
  assert '\ufffd' in by_line[15]['raw']  # undecodable bytes shown, not lost
  assert len(read_split(str(out), 'train')['age_xf']) == 54

  # The summary: the counts, each reason with its first rows (file:line, reason, the record),
  # where the dead letters and the outputs are.
  assert re.search(r'train +60 +54 +6\n', summary)
  assert f'train: 6 rows rejected, all of them in {out}/errors/train.jsonl' in summary
  assert '    bad_number: 3\n' in summary and '    field_count: 1\n' in summary
  assert f"{csv_path}:10: column 'age': 'thirty' is not a valid int64\n        | thirty," in summary
  assert f'{csv_path}:5: 5 fields, expected 15\n        | 39, State-gov, 77516' in summary
  assert re.search(r'60 rows read in [\d.]+s: [\d,]+ rows/s', summary)
  for line in (f'outputs in {out}:', f'shards        {out}/train-*-of-00001.tfrecord.gz',
               f'transform_fn  {out}/transform_fn', f'errors        {out}/errors/train.jsonl',
               f'report        {out}/report.html (statistics in {out}/statistics)'):
    assert line in summary


def test_too_many_bad_rows_fail_and_publish_nothing(tmp_path, capsys):
  csv_path = tmp_path / 'dirty.csv'
  _bad_adult_csv(csv_path)
  out = tmp_path / 'out'
  with pytest.raises(UserError) as e:
    tabular.run(['--transforms', 'transforms.census', '--train', str(csv_path),
                 '--output', str(out), '--max-bad-rows', '2'])
  message = str(e.value)
  assert '6 of 60 rows rejected' in message and 'nothing was published' in message
  assert '\n' not in message
  errors_file = message.split('see ')[1].split(';')[0]
  assert len(open(errors_file).readlines()) == 6
  # What was rejected is shown before the failure (a user need not open the file to see why).
  summary = capsys.readouterr().out
  assert f'train: 6 rows rejected, all of them in {errors_file}' in summary
  assert (f'{csv_path}:15: bytes that are not valid UTF-8\n'
          '        | 40, Priv\ufffd\ufffdate') in summary
  assert not os.path.exists(out / 'manifest.json')
  assert not [f for f in os.listdir(out) if f.startswith('train-')]


@pytest.mark.parametrize('beam_args', [
    [], ['--direct_num_workers=2', '--direct_running_mode=multi_processing']],
    ids=['in_process', 'two_worker_processes'])
def test_header_gzip_several_globs_and_a_module_file(tmp_path, beam_args):
  """A user's own module file, CSVs with a header (columns in another order, an extra column),
  gzip and plain files from two globs, VarLen missing values and FixedLen defaults. Worker
  processes cannot import the module file: its functions must travel to them by value."""
  module = tmp_path / 'houses.py'
  module.write_text('''
import tensorflow as tf
import tensorflow_transform as tft

RAW_FEATURE_SPEC = {
    'price': tf.io.FixedLenFeature([], tf.float32),
    'rooms': tf.io.FixedLenFeature([], tf.int64, default_value=3),
    'city': tf.io.VarLenFeature(tf.string),
    'sold': tf.io.FixedLenFeature([], tf.string),
}
LABEL_KEY = 'sold'
NA_VALUES = ('NA',)

def preprocessing_fn(inputs):
  return {
      'price_xf': tft.scale_to_z_score(inputs['price']),
      'rooms_xf': inputs['rooms'],
      'city_xf': tft.compute_and_apply_vocabulary(
          tft.sparse_tensor_to_dense_with_shape(inputs['city'], [None, 1], '')[:, 0],
          vocab_filename='city'),
      'sold_xf': tf.cast(tf.equal(inputs['sold'], 'yes'), tf.int64),
  }
''')
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  (tmp_path / 'a' / 'part1.csv').write_text(
      'city,price,note,rooms,sold\n'
      'Oslo, 100.5,x, 2,yes\n'
      'Bergen,200,y,,no\n'
      'NA,300,z,4,yes\n')
  with gzip.open(tmp_path / 'b' / 'part2.csv.gz', 'wt') as f:
    f.write('sold,rooms,price,city,note\nno,5,400,Oslo,w\n')
  out = tmp_path / 'out'
  manifest = tabular.run(['--transforms', str(module), '--train', str(tmp_path / 'a' / '*.csv'),
                          str(tmp_path / 'b' / '*.gz'), '--output', str(out)] + beam_args)
  assert manifest.splits['train'].rows_written == 4
  got = read_split(str(out), 'train')
  order = np.argsort(got['price_xf'])
  prices = np.array([100.5, 200, 300, 400])
  np.testing.assert_allclose(got['price_xf'][order], (prices - prices.mean()) / prices.std(),
                             rtol=1e-5)
  assert got['rooms_xf'][order].tolist() == [2, 3, 4, 5]  # the empty cell got the default 3
  assert got['sold_xf'][order].tolist() == [1, 0, 1, 0]
  vocab = open(out / 'transform_fn' / 'assets' / 'city').read().split('\n')
  assert vocab[:2] == ['Oslo', 'Bergen']


def _run(tmp_path, *extra, train=None):
  train = train or str(ADULT_TRAIN)
  return tabular.run(['--transforms', 'transforms.census', '--train', train,
                      '--output', str(tmp_path / 'out'), *extra])


@pytest.mark.parametrize('make_input, expected', [
    (lambda p: str(p / 'nothing-*.csv'), 'no file matches'),
    (lambda p: (p / 'empty.csv').write_text('') and None or str(p / 'empty.csv'),
     'every matched file is empty'),
    (lambda p: (p / 'narrow.csv').write_text('1,2,3\n4,5,6\n') and None or str(p / 'narrow.csv'),
     'rows have 3 fields but 15 columns are expected'),
    (lambda p: (p / 'bad.csv.gz').write_bytes(b'not gzip at all') and None or str(p / 'bad.csv.gz'),
     'cannot read'),
    (lambda p: (p / 'header.csv').write_text(','.join(census.CSV_COLUMNS) + '\n\n') and None or
     str(p / 'header.csv'), r'every matched file is empty or holds only a header row \(.*\); give'),
    (lambda p: (p / 'huge.csv').write_text('a' * (csv_layout.FIELD_SIZE_LIMIT + 1)) and None or
     str(p / 'huge.csv'), r'huge.csv: its first record is not readable CSV \(field larger'),
])
def test_input_errors(tmp_path, make_input, expected):
  with pytest.raises(UserError, match=expected):
    _run(tmp_path, train=make_input(tmp_path))
  assert not os.path.exists(tmp_path / 'out')


def test_header_lacking_a_column(tmp_path):
  path = tmp_path / 'h.csv'
  path.write_text('age,workclass\n39,Private\n')
  with pytest.raises(UserError, match=r"header row lacks column\(s\)"):
    _run(tmp_path, train=str(path))


def test_header_lacking_the_label(tmp_path):
  columns = [c for c in census.CSV_COLUMNS if c != census.LABEL_KEY]
  path = tmp_path / 'h.csv'
  path.write_text(','.join(columns) + '\n' + ','.join(['1'] * len(columns)) + '\n')
  with pytest.raises(UserError) as e:
    _run(tmp_path, train=str(path))
  assert str(e.value).startswith(f"{path}: the header row lacks column(s) ['income_bracket'] "
                                 '(the label column among them)')
  assert 'add them to the file or fix RAW_FEATURE_SPEC' in str(e.value)


def _under_a_file(tmp_path):
  (tmp_path / 'a_file').write_text('not a directory')
  return str(tmp_path / 'a_file' / 'out')


def _read_only_dir(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('running as root, whom a directory without write permission does not stop')
  (tmp_path / 'ro').mkdir()
  os.chmod(tmp_path / 'ro', 0o555)
  return str(tmp_path / 'ro' / 'out')


@pytest.mark.parametrize('make_output', [_under_a_file, _read_only_dir],
                         ids=['under_a_regular_file', 'read_only_directory'])
@pytest.mark.parametrize('pipeline', ['tabular', 'images'])
def test_output_that_is_not_writable(tmp_path, make_output, pipeline):
  """Found before any work: one line naming --output and what to do."""
  output = make_output(tmp_path)
  if pipeline == 'tabular':
    def run():
      return _run(tmp_path, '--output', output)  # the last --output wins
  else:
    def run():
      return images.run(['--train', str(REPO / 'data' / 'fashion_mnist' / 'sample' / 'test'),
                         '--output', output])
  with pytest.raises(UserError) as e:
    run()
  assert str(e.value).startswith(f'--output {output} is not writable (')
  assert str(e.value).endswith('choose a directory you can write to') and '\n' not in str(e.value)


@pytest.mark.parametrize('flags, expected', [
    (['--num-shards', '0'], '--num-shards 0: must be at least 1'),
    (['--eval', str(ADULT_TRAIN), '--eval-fraction', '0.1'], 'either --eval or --eval-fraction'),
    (['--max-bad-rows', 'lots'], "--max-bad-rows 'lots'"),
    (['--runner', 'DataflowRunner', '--project', 'p', '--region', 'r', '--temp_location',
      'gs://b/tmp'], 'DataflowRunner workers cannot read local paths'),
])
def test_flag_errors(tmp_path, flags, expected):
  with pytest.raises(UserError, match=expected):
    _run(tmp_path, *flags)


def test_module_errors(tmp_path):
  no_fn = tmp_path / 'no_fn.py'
  no_fn.write_text('import tensorflow as tf\nRAW_FEATURE_SPEC = {"a": tf.io.FixedLenFeature([], '
                   'tf.int64)}\nLABEL_KEY = "a"\n')
  with pytest.raises(UserError, match='defines no preprocessing_fn'):
    tabular.run(['--transforms', str(no_fn), '--train', str(ADULT_TRAIN), '--output',
                 str(tmp_path / 'o')])
  with pytest.raises(UserError, match="no module named 'transforms.nope'"):
    tabular.run(['--transforms', 'transforms.nope', '--train', str(ADULT_TRAIN), '--output',
                 str(tmp_path / 'o')])


def _failing_run(tmp_path, returned):
  """The one-line error of a run whose preprocessing_fn returns `returned` (source text) on a
  one-row CSV; checks that the run published nothing and kept its traceback."""
  module = tmp_path / 'broken.py'
  module.write_text(f'''
import tensorflow as tf
RAW_FEATURE_SPEC = {{'city': tf.io.VarLenFeature(tf.string),
                    'n': tf.io.FixedLenFeature([], tf.int64)}}
LABEL_KEY = 'n'
def preprocessing_fn(inputs):
  return {returned}
''')
  data = tmp_path / 'd.csv'
  data.write_text('city,n\nOslo,1\n')
  out = tmp_path / 'out'
  with pytest.raises(UserError) as e:
    tabular.run(['--transforms', str(module), '--train', str(data), '--output', str(out)])
  message = str(e.value)
  assert '\n' not in message and message.endswith('nothing was published')
  assert os.path.isfile(message.split('full traceback in ')[1].split(';')[0])
  assert not os.path.exists(out / 'manifest.json')
  return message


def test_a_failing_preprocessing_fn_is_one_line_and_publishes_nothing(tmp_path):
  # A 2-D dense output of unknown width: TFT cannot describe it.
  message = _failing_run(tmp_path, "{'city_xf': tf.sparse.to_dense(inputs['city'], "
                                   "default_value='')}")
  assert message.startswith('the pipeline failed:') and 'city_xf' in message


@pytest.mark.parametrize('body,expected', [
    ("{'len_xf': tf.strings.length(inputs['city'].values)}",
     'invalid dtype <dtype: \'int32\'> for feature spec; outputs must be int64, float32 or '
     'string tensors'),
    ("{'x_xf': inputs['nope']}", "KeyError: 'nope'"),
])
def test_a_preprocessing_fn_that_cannot_be_traced_is_one_line(tmp_path, body, expected):
  message = _failing_run(tmp_path, body)
  assert message.startswith('the preprocessing_fn could not be traced:') and expected in message


# ---- regressions found by tests/test_properties.py -------------------------------------------

CONTRACT = '''
import tensorflow as tf
RAW_FEATURE_SPEC = {'n': tf.io.FixedLenFeature([], tf.int64),
                    'city': tf.io.VarLenFeature(tf.string)}
LABEL_KEY = 'n'
def preprocessing_fn(inputs):
  return {'n_xf': inputs['n']}
'''
HEADER = b'n,city,note\n'


def _read_csv(tmp_path, body, chunk, fast=True, max_chunk=None):
  """(rows as (n, city), {line: kind} of dead letters) of ReadCsvFileFn over HEADER + body."""
  module = tmp_path / 'contract.py'
  module.write_text(CONTRACT)
  contract = contract_lib.load(str(module))
  fmt = csv_layout.CsvFormat(columns=contract.columns, column_names=None)
  path = tmp_path / 'data.csv'
  path.write_bytes(HEADER + body)
  saved = (csv_rows.fast_block, csv_chunks._FIRST_CHUNK, csv_chunks._CHUNK,
           csv_chunks._MAX_CHUNK)
  try:
    if not fast:
      csv_rows.fast_block = lambda *args: None
    csv_chunks._FIRST_CHUNK = csv_chunks._CHUNK = chunk
    csv_chunks._MAX_CHUNK = max_chunk or saved[3]
    out = list(csv_files.ReadCsvFileFn(fmt, 'train').process(str(path)))
  finally:
    (csv_rows.fast_block, csv_chunks._FIRST_CHUNK, csv_chunks._CHUNK,
     csv_chunks._MAX_CHUNK) = saved
  rows = [(r['n'][0], r['city'][0].decode() if r['city'] else None)
          for o in out if isinstance(o, pa.RecordBatch) for r in o.to_pylist()]
  return rows, {o.value['line']: o.value['kind'] for o in out if not isinstance(o, pa.RecordBatch)}


FILLER = b''.join(b'%d,c%d,x\n' % (i, i) for i in range(10, 40))
FILLED = [(i, f'c{i}') for i in range(10, 40)]


@pytest.mark.parametrize('body, rows, errors', [
    # A quote inside an unquoted field is text to the csv module; counting quotes to find where
    # records end then cut the quoted line break of the next record in two.
    (b'1,5\'10",x\n2,"two\nlines",y\n' + FILLER, [(1, '5\'10"'), (2, 'two\nlines')] + FILLED, {}),
    # A quoted field still open at the end of the file swallowed the lines after it into one
    # "valid" row.
    (FILLER + b'3,"open\n4,d,x\n', FILLED, {32: 'malformed_csv'}),
    # A field over FIELD_SIZE_LIMIT was taken by the fast path (only the exact one rejected it).
    (FILLER + b'5,' + b'a' * (csv_layout.FIELD_SIZE_LIMIT + 1) + b',x\n6,e,x\n',
     FILLED + [(6, 'e')], {32: 'malformed_csv'}),
    # Bytes that are not UTF-8 in a column outside the contract: the fast path let them through.
    (FILLER + b'7,f,\xff\xfe\n', FILLED, {32: 'bad_encoding'}),
    # A NUL byte (binary data, a damaged file) was read as part of a value.
    (FILLER + b'8,g\0h,x\n', FILLED, {32: 'malformed_csv'}),
])
@pytest.mark.parametrize('chunk', [64, 1 << 16])
@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'exact'])
def test_csv_reader_regressions(tmp_path, body, rows, errors, chunk, fast):
  got_rows, got_errors = _read_csv(tmp_path, body, chunk, fast)
  assert sorted(got_rows) == sorted(rows) and got_errors == errors


def test_rows_before_a_giving_up_chunker_are_kept(tmp_path):
  """Where no record boundary turns up in _MAX_CHUNK bytes the rest of the file is read record
  by record; the bytes already buffered were lost (the rows in them silently dropped)."""
  body = FILLER + b'9,"a long\n' + b'quoted field\n' * 40 + b'",x\n' + FILLER
  rows, errors = _read_csv(tmp_path, body, 64, max_chunk=256)
  assert sorted(rows) == sorted(FILLED * 2 + [(9, ('a long\n' + 'quoted field\n' * 40).strip())])
  assert errors == {}


def test_a_stray_quote_keeps_a_file_in_one_range(tmp_path):
  """Byte ranges are cut by counting quotes too: a stray quote would cut a record in two."""
  path = tmp_path / 'stray.csv'
  path.write_bytes(HEADER + b'1,5\'10",x\n' + b'2,"two\nlines",y\n' * 200)
  size = os.path.getsize(path)
  assert len(csv_layout.plan_ranges(str(path), size, None, range_bytes=256)) == 1
  path.write_bytes(HEADER + b'1,5 ft,x\n' + b'2,"two\nlines",y\n' * 200)
  assert len(csv_layout.plan_ranges(str(path), size, None, range_bytes=256)) > 1


def test_image_inputs_without_images(tmp_path):
  """Empty shards are refused at launch; a tar with no members (only its end blocks) is found
  when no image was read, before anything is published."""
  (tmp_path / 'empty.tfrecord').write_bytes(b'')
  with pytest.raises(UserError, match=r'--train .*empty.tfrecord: every matched file is empty '
                                      r'\(0 bytes\); check the paths'):
    images.run(['--train', str(tmp_path / 'empty.tfrecord'), '--output', str(tmp_path / 'o1')])
  assert not os.path.exists(tmp_path / 'o1')
  tarfile.open(tmp_path / 'none.tar', 'w').close()
  out = tmp_path / 'o2'
  with pytest.raises(UserError, match='--train: no images were read from its inputs .*; nothing '
                                      'was published'):
    images.run(['--train', str(tmp_path / 'none.tar'), '--output', str(out)])
  assert not os.path.exists(out / 'manifest.json')
  with pytest.raises(UserError, match='the eval split is empty: its --eval inputs hold no images '
                                      r'.*; nothing was published'):
    images.run(['--train', str(REPO / 'data' / 'fashion_mnist' / 'sample' / 'test'),
                '--eval', str(tmp_path / 'none.tar'), '--output', str(out)])
  assert not os.path.exists(out / 'manifest.json')


def test_image_num_shards_zero(tmp_path):
  with pytest.raises(UserError, match='--num-shards 0: must be at least 1'):
    images.run(['--train', str(REPO / 'data' / 'fashion_mnist' / 'sample' / 'test'),
                '--num-shards', '0', '--output', str(tmp_path / 'out')])
  assert not os.path.exists(tmp_path / 'out')


def test_an_inverse_label_fn_that_cannot_be_traced_fails_at_the_start(tmp_path):
  module = tmp_path / 'inverse.py'
  module.write_text('''
import tensorflow as tf
RAW_FEATURE_SPEC = {'x': tf.io.FixedLenFeature([], tf.float32),
                    'y': tf.io.FixedLenFeature([], tf.float32)}
LABEL_KEY = 'y'
def preprocessing_fn(inputs):
  return {'x_xf': inputs['x'], 'y_xf': tf.math.log(inputs['y'])}
def inverse_label_fn(y):
  return y.numpy() * 2  # not a TensorFlow op: there is no value while tracing
''')
  data = tmp_path / 'd.csv'
  data.write_text('x,y\n1,2\n')
  out = tmp_path / 'out'
  with pytest.raises(UserError, match=r'^inverse_label_fn\(y\) cannot be traced for a float32 '
                                      r'\[batch\] y: .*write it with TensorFlow ops'):
    tabular.run(['--transforms', str(module), '--train', str(data), '--output', str(out)])
  assert not os.path.exists(out / 'manifest.json')


@pytest.mark.parametrize('argv,message', [
    (['--eval-fration', '0.2'], 'unknown flag --eval-fration; did you mean --eval-fraction?'),
    (['--zzzz', '/tmp/cache'], 'unknown flag --zzzz; see --help'),
    (['--direct_num_worker=2'], 'unknown flag --direct_num_worker; did you mean '
                                '--direct_num_workers?'),
    (['stray'], "unexpected argument 'stray'"),
])
def test_a_flag_neither_the_command_nor_beam_knows_is_an_error(argv, message):
  base = ['--transforms', 'transforms.census', '--train', str(ADULT_TRAIN), '--output', '/tmp/x']
  with pytest.raises(UserError, match=re.escape(message)):
    tabular.parse_args(base + argv)
  with pytest.raises(UserError, match=re.escape(message)):
    images.parse_args(['--train', 'x', '--output', '/tmp/x'] + argv)


def test_beam_flags_pass_through():
  args, beam_args = tabular.parse_args(
      ['--transforms', 'transforms.census', '--train', str(ADULT_TRAIN), '--output', '/tmp/x',
       '--direct_num_workers=2', '--direct_running_mode', 'multi_threading', '--eval-fraction',
       '0.1'])
  assert args.eval_fraction == 0.1
  assert beam_args == ['--direct_num_workers=2', '--direct_running_mode', 'multi_threading']
