"""The statistics and DIR/report.html of real runs: statistics against pandas/numpy on the same
rows, every number the page shows against the manifest and the statistics files, drift and
vocabulary measures against independent computations, and the page rendered by headless
Chromium (skipped, saying why, where Chromium is not installed)."""

import collections
import html.parser
import io
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
import tensorflow_transform as tft
from PIL import Image
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines import images, statistics, tabular
from tests.conftest import REPO
from tests.helpers import read_adult_csv, read_split
from transforms import census
from transforms.errors import UserError

SAMPLE = REPO / 'data' / 'fashion_mnist' / 'sample'
CHROMIUM = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome')
                 if shutil.which(n)), None)
# Two rows the reader rejects, appended to the train sample: a number that does not parse, and
# an empty cell of a FixedLenFeature without default.
BAD_ROWS = (b'abc, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, '
            b'White, Male, 2174, 0, 40, United-States, <=50K\n'
            b', Private, 77516, HS-grad, 9, Divorced, Sales, Unmarried, White, Female, 0, 0, 40, '
            b'United-States, <=50K\n')


# ---- independent readers ---------------------------------------------------------------------


class _Numbers(html.parser.HTMLParser):
  """Every element of the page with a data-value: {(attribute, key): (exact value, shown text)}."""

  ATTRIBUTES = ('data-stat', 'data-manifest', 'data-drift', 'data-vocab', 'data-constant',
                'data-channel')

  def __init__(self):
    super().__init__()
    self.found = {}
    self.images = {}
    self._open = []  # [tag, key, value, text parts]

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if 'data-image' in attrs:
      self.images[attrs['data-image']] = attrs['src']
    for name in self.ATTRIBUTES:
      if name in attrs and 'data-value' in attrs:
        self._open.append([tag, (name[5:], attrs[name]), attrs['data-value'], []])
        return
    if self._open and tag == self._open[-1][0]:
      self._open[-1].append(None)  # the same tag nested: wait for its end first

  def handle_data(self, data):
    for entry in self._open:
      entry[3].append(data)

  def handle_endtag(self, tag):
    if self._open and tag == self._open[-1][0]:
      if self._open[-1][-1] is None:
        self._open[-1].pop()
        return
      _, key, value, text = self._open.pop()
      self.found[key] = (value, ''.join(text).strip())


def page_numbers(out):
  parser = _Numbers()
  with open(os.path.join(out, 'report.html'), encoding='utf-8') as f:
    parser.feed(f.read())
  return parser


def load_statistics(out, split, stage):
  result = statistics_pb2.DatasetFeatureStatisticsList()
  with open(os.path.join(out, 'statistics', f'{split}_{stage}.pb'), 'rb') as f:
    result.ParseFromString(f.read())
  (dataset,) = result.datasets
  return dataset, {f.path.step[0]: f for f in dataset.features}


def proto_value(feature, stat):
  """A statistic as the page names it, read straight from the proto (not via pipelines.report)."""
  if feature.HasField('num_stats'):
    s, common = feature.num_stats, feature.num_stats.common_stats
    fields = {'min': s.min, 'max': s.max, 'mean': s.mean, 'std_dev': s.std_dev,
              'median': s.median, 'zeros': s.num_zeros}
  elif feature.HasField('bytes_stats'):
    s, common = feature.bytes_stats, feature.bytes_stats.common_stats
    fields = {'distinct': s.unique, 'avg_bytes': s.avg_num_bytes, 'min_bytes': s.min_num_bytes,
              'max_bytes': s.max_num_bytes}
  else:
    s, common = feature.string_stats, feature.string_stats.common_stats
    fields = {'distinct': s.unique, 'avg_length': s.avg_length}
    if stat.startswith('top/'):
      rank = int(stat.split('/')[1])
      return {b.label: b.sample_count for b in s.rank_histogram.buckets}, rank
  fields.update(count=common.num_non_missing, missing=common.num_missing,
                num_values=common.tot_num_values)
  return fields[stat]


def shown_matches(text, value):
  """The rounded number on the page is the exact value, to the page's precision."""
  if value is None:
    return text == '–'
  number = float(text.replace(',', '').replace('%', ''))
  return abs(number - value) <= max(0.051, 6e-4 * abs(value))


def screenshot(page, path):
  """Renders `page` in headless Chromium at 1280x2000; returns the screenshot as an array."""
  subprocess.run(
      [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
       f'--screenshot={path}', '--window-size=1280,2000', f'file://{page}'],
      check=True, capture_output=True, timeout=120)
  return np.asarray(Image.open(path).convert('RGB'), np.float64)


def assert_not_blank(pixels):
  assert pixels.shape == (2000, 1280, 3)
  gray = pixels.mean(axis=2)
  assert gray.std() > 20, 'the screenshot is (nearly) one colour'
  ink = (gray < 200).mean()
  assert 0.02 < ink < 0.6, f'{ink:.1%} of the pixels are dark'


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason='Chromium is not installed (apt-get install chromium); the report '
                             'is rendered by a real browser in this test')


# ---- statistics without a pipeline: the combiner's merges are exact ------------------------


def test_combiner_merges_exactly():
  rng = np.random.default_rng(7)
  values = np.concatenate([rng.normal(3, 40, 5000), [np.nan] * 7, rng.normal(1e4, 1, 300)])
  ints = rng.integers(-500, 20_000, len(values))
  words = rng.choice(['a', 'bb', 'ccc', 'dd'], len(values))
  missing = rng.random(len(values)) < 0.05

  def batch(lo, hi):
    present = ~missing[lo:hi]
    offsets = np.concatenate([[0], np.cumsum(present)])
    return pa.record_batch([
        pa.array(values[lo:hi].astype(np.float32)),
        pa.LargeListArray.from_arrays(pa.array(np.arange(hi - lo + 1)), pa.array(ints[lo:hi])),
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(
            [w.encode() for w in words[lo:hi][present]], pa.large_binary())),
    ], names=['f', 'i', 's'])

  fn = statistics.StatisticsFn('t')
  cuts = [0, 1, 900, 2500, 2501, 4000, len(values)]
  whole = batch(0, len(values))
  accumulators = []
  for lo, hi in zip(cuts, cuts[1:]):  # batches of their own, and slices of one (offsets inside)
    acc = fn.add_input(fn.create_accumulator(), batch(lo, hi) if lo % 2 else
                       whole.slice(lo, hi - lo))
    accumulators.append(acc)
  merged = fn.merge_accumulators([fn.merge_accumulators(accumulators[:3]),
                                  fn.merge_accumulators(accumulators[3:])])
  proto, sample = fn.extract_output(merged)
  (dataset,) = statistics_pb2.DatasetFeatureStatisticsList.FromString(proto).datasets
  features = {f.path.step[0]: f for f in dataset.features}
  assert dataset.num_examples == len(values)
  assert sample.num_rows == statistics.SAMPLE_ROWS

  f32 = values.astype(np.float32).astype(np.float64)
  finite = f32[~np.isnan(f32)]
  f = features['f'].num_stats
  assert f.histograms[0].num_nan == 7
  assert f.min == finite.min() and f.max == finite.max()
  assert math.isclose(f.mean, finite.mean(), rel_tol=1e-12)
  assert math.isclose(f.std_dev, finite.std(), rel_tol=1e-9)
  for name, data in (('f', finite), ('i', ints.astype(np.float64))):
    histogram = features[name].num_stats.histograms[0]
    edges = [b.low_value for b in histogram.buckets] + [histogram.buckets[-1].high_value]
    assert len(histogram.buckets) <= statistics.MAX_BINS
    np.testing.assert_array_equal([b.sample_count for b in histogram.buckets],
                                  np.histogram(data, edges)[0])
    width = edges[1] - edges[0]
    assert abs(features[name].num_stats.median - np.median(data)) <= width
  s = features['s'].string_stats
  assert s.common_stats.num_missing == missing.sum()
  expected = collections.Counter(words[~missing])
  assert {t.value: t.frequency for t in s.top_values} == expected
  assert s.unique == len(expected)


def test_a_drift_threshold_outside_0_1_is_refused():
  with pytest.raises(UserError, match='--drift-numeric-threshold.*between 0 and 1'):
    tabular.parse_args(['--transforms', 'transforms.census', '--train', 'x.csv', '--output',
                        'o', '--drift-numeric-threshold', '2'])


# ---- a tabular run ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def adult_report(adult_sample, tmp_path_factory):
  train_csv, test_csv = adult_sample
  root = tmp_path_factory.mktemp('report')
  messy = root / 'train.csv'
  messy.write_bytes(train_csv.read_bytes() + BAD_ROWS)
  out = str(root / 'out')
  manifest = tabular.run(['--transforms', 'transforms.census', '--train', str(messy),
                          '--eval', str(test_csv), '--output', out])
  return {'out': out, 'manifest': manifest, 'page': page_numbers(out),
          'raw': {'train': read_adult_csv(train_csv),  # the good rows: the bad ones appended
                  'eval': read_adult_csv(test_csv, skiprows=1)},  # its junk first line
          'transformed': {s: read_split(out, s) for s in ('train', 'eval')}}


def test_statistics_files_are_published_and_listed(adult_report):
  out, manifest = adult_report['out'], adult_report['manifest']
  assert manifest.to_dict() == json.load(open(os.path.join(out, 'manifest.json')))
  assert manifest.report == 'report.html'
  listed = manifest.statistics
  for split in ('train', 'eval'):
    for stage in ('raw', 'transformed'):
      assert os.path.isfile(os.path.join(out, listed['files'][split][stage]))
  summary = json.load(open(os.path.join(out, listed['summary'])))
  assert sorted(summary['features']['raw']['train']) == sorted(census.RAW_FEATURE_SPEC)
  assert not os.path.exists(os.path.join(out, '.staging'))
  assert manifest.splits['train'].rows_rejected == 2


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_raw_statistics_equal_pandas(adult_report, split):
  frame = adult_report['raw'][split]
  dataset, features = load_statistics(adult_report['out'], split, 'raw')
  assert dataset.num_examples == len(frame) == adult_report['manifest'].splits[split].rows_written
  for key in census.NUMERIC_FEATURE_KEYS:
    s = features[key].num_stats
    values = frame[key].to_numpy(np.float64)
    assert features[key].type == statistics_pb2.FeatureNameStatistics.INT
    assert s.common_stats.num_non_missing == frame[key].count()
    assert s.common_stats.num_missing == 0
    assert (s.min, s.max) == (values.min(), values.max())
    assert math.isclose(s.mean, values.mean(), rel_tol=1e-12)
    assert math.isclose(s.std_dev, frame[key].std(ddof=0), rel_tol=1e-9)
    assert s.num_zeros == (values == 0).sum()
    histogram = s.histograms[0]
    edges = [b.low_value for b in histogram.buckets] + [histogram.buckets[-1].high_value]
    np.testing.assert_array_equal([b.sample_count for b in histogram.buckets],
                                  np.histogram(values, edges)[0])
    assert abs(s.median - np.median(values)) <= edges[1] - edges[0]
    if (values == 0).mean() > 0.5:  # count-like (capital_gain): exactly 0, not mid-bin
      assert s.median == np.median(values) == 0
  for key in census.CATEGORICAL_FEATURE_KEYS + (census.LABEL_KEY,):
    s = features[key].string_stats
    column = frame[key]
    assert s.common_stats.num_non_missing == column.count()
    assert s.common_stats.num_missing == column.isna().sum()
    assert s.unique == column.nunique()
    counts = column.value_counts()
    assert {b.label: b.sample_count for b in s.rank_histogram.buckets} == counts.to_dict()
    assert [t.frequency for t in s.top_values] == sorted(counts, reverse=True)[:20]
    assert math.isclose(s.avg_length, column.dropna().str.len().mean(), rel_tol=1e-6)


def test_transformed_statistics_equal_the_written_examples(adult_report):
  for split in ('train', 'eval'):
    got = adult_report['transformed'][split]
    _, features = load_statistics(adult_report['out'], split, 'transformed')
    assert sorted(features) == sorted(got)
    for key, values in got.items():
      s = features[key].num_stats
      values = values.astype(np.float64)
      assert s.common_stats.num_non_missing == len(values)
      assert (s.min, s.max) == (values.min(), values.max())
      assert math.isclose(s.mean, values.mean(), rel_tol=1e-9, abs_tol=1e-12)
      assert math.isclose(s.std_dev, values.std(), rel_tol=1e-9, abs_tol=1e-12)


def test_page_numbers_are_the_manifest_and_the_statistics(adult_report):
  out, manifest, page = adult_report['out'], adult_report['manifest'], adult_report['page']
  shown = collections.Counter(kind for kind, _ in page.found)
  for split, counts in manifest.splits.items():
    for key in ('rows_read', 'rows_written', 'rows_rejected'):
      value, text = page.found[('manifest', f'{split}/{key}')]
      assert int(value) == getattr(counts, key) == int(text.replace(',', ''))
    for kind, count in counts.rejected_by_kind.items():
      assert int(page.found[('manifest', f'{split}/rejected/{kind}')][0]) == count
  assert page.found[('manifest', 'train/rejected/bad_number')][0] == '1'
  assert page.found[('manifest', 'train/rejected/missing_value')][0] == '1'
  assert float(page.found[('manifest', 'elapsed_seconds')][0]) == manifest.elapsed_seconds

  protos = {(split, stage): load_statistics(out, split, stage)[1]
            for split in ('train', 'eval') for stage in ('raw', 'transformed')}
  stat_keys = [key for kind, key in page.found if kind == 'stat']
  for key in stat_keys:
    split, stage, feature, stat = key.split('/', 3)
    if stat.endswith('/value'):
      continue
    value, text = page.found[('stat', key)]
    expected = proto_value(protos[(split, stage)][feature], stat)
    if stat.startswith('top/'):
      counts, rank = expected
      label = page.found[('stat', f'train/{stage}/{feature}/top/{rank}/value')][0]
      expected = counts.get(label, 0)
    assert float(value) == expected, key
    assert shown_matches(text, expected), (key, text, expected)
  # Every raw and transformed feature of both splits is on the page with its count.
  for (split, stage), features in protos.items():
    for feature in features:
      assert f'{split}/{stage}/{feature}/count' in stat_keys
  assert shown['stat'] > 300


def test_drift_measures_and_flags(adult_report):
  page, frames = adult_report['page'], adult_report['raw']
  out = adult_report['out']
  train_stats, eval_stats = (load_statistics(out, s, 'raw')[1] for s in ('train', 'eval'))
  for key in census.CATEGORICAL_FEATURE_KEYS + (census.LABEL_KEY,):
    p = frames['train'][key].value_counts(normalize=True)
    q = frames['eval'][key].value_counts(normalize=True)
    expected = max(abs(p.get(v, 0) - q.get(v, 0)) for v in set(p.index) | set(q.index))
    value = float(page.found[('drift', f'{key}/value')][0])
    assert math.isclose(value, expected, rel_tol=1e-9), key
    assert page.found[('drift', f'{key}/drifting')][0] == str(value > 0.1)
  for key in census.NUMERIC_FEATURE_KEYS:
    # Common bins: the wider of the two histograms' power-of-two widths over both ranges.
    widths = [h.buckets[0].high_value - h.buckets[0].low_value
              for h in (train_stats[key].num_stats.histograms[0],
                        eval_stats[key].num_stats.histograms[0])]
    width = max(widths)
    low = math.floor(min(f[key].min() for f in frames.values()) / width) * width
    high = (math.floor(max(f[key].max() for f in frames.values()) / width) + 1) * width
    edges = np.arange(low, high + width / 2, width)
    p = np.histogram(frames['train'][key], edges)[0] / len(frames['train'])
    q = np.histogram(frames['eval'][key], edges)[0] / len(frames['eval'])
    m = (p + q) / 2
    def kl(a, m=m):
      return np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0]))
    value = float(page.found[('drift', f'{key}/value')][0])
    assert math.isclose(value, 0.5 * kl(p) + 0.5 * kl(q), rel_tol=1e-9, abs_tol=1e-12), key
    assert page.found[('drift', f'{key}/drifting')][0] == str(value > 0.1)
  # The test file writes its labels `>50K.`: every label value is new, a drift the page flags.
  assert page.found[('drift', 'income_bracket/drifting')][0] == 'True'
  assert adult_report['manifest'].statistics['drifting_features'] == ['income_bracket']


def test_vocabularies_and_analyzer_constants(adult_report):
  page, frames, out = adult_report['page'], adult_report['raw'], adult_report['out']
  output = tft.TFTransformOutput(out)
  for key in census.CATEGORICAL_FEATURE_KEYS:
    vocabulary = {v.decode() for v in output.vocabulary_by_name(key)}
    assert int(page.found[('vocab', f'{key}/size')][0]) == len(vocabulary)
    # Counted on the ids of {key}_xf: a missing value (`?`) maps to the OOV bucket too.
    values = frames['eval'][key]
    expected = (values.isna() | ~values.isin(vocabulary)).sum() / len(values)
    assert float(page.found[('vocab', f'{key}/oov_share_eval')][0]) == expected, key
    ids = adult_report['transformed']['eval'][f'{key}_xf']
    assert expected == (ids >= len(vocabulary)).sum() / len(ids)
  train = frames['train']
  for key in census.NUMERIC_FEATURE_KEYS:  # scale_to_z_score's mean and variance
    constants = {k.split('/', 1)[1].rsplit('/', 1)[-1]: json.loads(v) for (kind, k), (v, _)
                 in page.found.items() if kind == 'constant' and k.startswith(f'{key}_xf/')}
    assert math.isclose(constants['sub_y'][0], train[key].mean(), rel_tol=1e-6)
    assert math.isclose(constants['sqrt_x'][0], train[key].var(ddof=0), rel_tol=1e-5)
  for key, n in census.BUCKET_FEATURE_KEYS.items():
    feature = census.bucket_name(key)
    boundaries = json.loads(page.found[('constant', f'{feature}/boundaries')][0])
    assert len(boundaries) == n - 1
    # The boundaries bucket the raw train values exactly as the written examples are bucketed.
    expected = np.bincount(np.digitize(train[key], boundaries), minlength=n)
    np.testing.assert_array_equal(
        np.bincount(adult_report['transformed']['train'][feature], minlength=n), expected)


def test_dead_letter_examples(adult_report):
  with open(os.path.join(adult_report['out'], 'report.html'), encoding='utf-8') as f:
    text = f.read()
  train_csv = adult_report['manifest'].inputs['train'][0]
  # Where (file:line), why and the record, of each kind.
  assert (f'{train_csv}:3001</span>: column &#x27;age&#x27;: &#x27;abc&#x27; '
          'is not a valid int64') in text
  assert f'{train_csv}:3002</span>: column &#x27;age&#x27; is empty' in text
  assert '|1x3 Cross validator' in text


@needs_chromium
def test_tabular_report_renders_in_chromium(adult_report, tmp_path):
  pixels = screenshot(os.path.join(adult_report['out'], 'report.html'), tmp_path / 'shot.png')
  assert_not_blank(pixels)
  # The drift badge (red) and the train histogram bars (blue) are drawn.
  red = (pixels[..., 0] > 170) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
  blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 120)
  assert red.sum() > 200 and blue.sum() > 2000


# ---- an image run ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def image_report(tmp_path_factory):
  root = tmp_path_factory.mktemp('image_report')
  files = {}
  for split, per_class in (('train', 3), ('test', 2)):
    for label in sorted(os.listdir(SAMPLE / split)):
      (root / split / label).mkdir(parents=True)
      for path in sorted((SAMPLE / split / label).glob('*.png'))[:per_class]:
        shutil.copy(path, root / split / label / path.name)
        files.setdefault(split, []).append((label, root / split / label / path.name))
  (root / 'train' / 'Bag' / 'notes.png').write_bytes(b'not an image at all')
  out = str(root / 'out')
  manifest = images.run(['--train', str(root / 'train'), '--eval', str(root / 'test'),
                         '--output', out, '--max-bad-rows', '5'])
  return {'out': out, 'manifest': manifest, 'files': files, 'page': page_numbers(out)}


def _pixels(data):
  array = np.asarray(Image.open(io.BytesIO(data)).convert('L'), np.uint8)
  return array.tobytes()


def test_image_report(image_report):
  page, files, out = image_report['page'], image_report['files'], image_report['out']
  assert page.found[('manifest', 'train/rejected/not_an_image')][0] == '1'
  train_pixels = [np.asarray(Image.open(p), np.float64) / 255 for _, p in files['train']]
  flat = np.concatenate([p.ravel() for p in train_pixels])
  assert math.isclose(float(page.found[('channel', '0/mean')][0]), flat.mean(), rel_tol=1e-5)
  assert math.isclose(float(page.found[('channel', '0/std')][0]), flat.std(), rel_tol=1e-5)
  # The sample images are images of the split: raw ones as read, transformed ones after decode
  # (28x28 already: no resize, so the very pixels).
  inputs = {_pixels(p.read_bytes()) for _, p in files['train']}
  for stage in ('raw', 'transformed'):
    shown = [src for key, src in page.images.items() if key.startswith(stage + '/')]
    assert len(shown) == 12
    for src in shown:
      assert src.startswith('data:image/png;base64,')
      data = __import__('base64').b64decode(src.split(',', 1)[1])
      assert Image.open(io.BytesIO(data)).size == (28, 28)
      assert _pixels(data) in inputs
  # Encoded images get byte statistics: distinct images and their sizes.
  _, features = load_statistics(out, 'train', 'raw')
  image = features['image'].bytes_stats
  sizes = [p.stat().st_size for _, p in files['train']]
  assert image.unique == len(sizes) == 30
  assert (image.min_num_bytes, image.max_num_bytes) == (min(sizes), max(sizes))
  assert math.isclose(image.avg_num_bytes, np.mean(sizes), rel_tol=1e-6)
  for key in ('distinct', 'avg_bytes', 'min_bytes', 'max_bytes', 'count'):
    assert float(page.found[('stat', f'train/raw/image/{key}')][0]) == proto_value(
        features['image'], key)


@needs_chromium
def test_image_report_renders_in_chromium(image_report, tmp_path):
  assert_not_blank(screenshot(os.path.join(image_report['out'], 'report.html'),
                              tmp_path / 'shot.png'))


def _string_batches(tokens, size):
  return [pa.record_batch([pa.LargeListArray.from_arrays(
      pa.array(np.arange(len(part) + 1)), pa.array(list(part), pa.large_binary()))], names=['s'])
      for part in (tokens[i:i + size] for i in range(0, len(tokens), size))]


def _string_stats(batches, order, groups):
  """The string statistics of `batches` added in `order`, in `groups` accumulators merged."""
  fn = statistics.StatisticsFn('t')
  accumulators = [fn.create_accumulator() for _ in range(groups)]
  for n, i in enumerate(order):
    fn.add_input(accumulators[n % groups], batches[i])
  proto, _ = fn.extract_output(fn.merge_accumulators(accumulators[::-1]))
  (dataset,) = statistics_pb2.DatasetFeatureStatisticsList.FromString(proto).datasets
  return dataset.features[0]


def test_top_values_are_exact_and_the_same_in_any_order():
  # 3,000 distinct values, Zipf-like: more than the Misra-Gries sketch holds (MG_BUCKETS), so
  # its result would depend on the order of batches and merges.
  rng = np.random.default_rng(3)
  tokens = [b'v%d' % v for v in np.minimum(rng.zipf(1.2, 60_000), 3000)] + [
      b'x' * 2000, b'y' * 1500, b'\xff\xfe']
  batches = _string_batches(tokens, 997)
  protos = {_string_stats(batches, order, groups).SerializeToString()
            for order, groups in [(range(len(batches)), 1), (rng.permutation(len(batches)), 3),
                                  (rng.permutation(len(batches)), 7)]}
  assert len(protos) == 1
  s = _string_stats(batches, range(len(batches)), 1).string_stats
  counts = collections.Counter(
      '__LARGE_BYTES__' if len(t) > 1024 else '__BYTES_VALUE__' if t == b'\xff\xfe' else t.decode()
      for t in tokens)
  expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
  assert [(b.label, b.sample_count) for b in s.rank_histogram.buckets] == \
      expected[:statistics.accumulators.MG_BUCKETS]
  assert [(t.value, t.frequency) for t in s.top_values] == expected[:20]
  assert counts['__LARGE_BYTES__'] == 2


def test_top_values_beyond_the_exact_limit_come_from_the_sketch(monkeypatch):
  monkeypatch.setattr(statistics.accumulators, 'EXACT_VALUES', 500)
  rng = np.random.default_rng(4)
  tokens = [b'w%d' % v for v in np.minimum(rng.zipf(1.3, 30_000), 5000)]
  s = _string_stats(_string_batches(tokens, 1000), range(30), 2).string_stats
  counts = collections.Counter(t.decode() for t in tokens)
  top = s.top_values[0]
  assert top.value == counts.most_common(1)[0][0]
  bound = len(tokens) / (statistics.accumulators.MG_BUCKETS + 1)
  for t in s.top_values:  # Misra-Gries: lower bounds, off by at most n / (buckets + 1)
    assert counts[t.value] - bound <= t.frequency <= counts[t.value]
