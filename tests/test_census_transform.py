"""The census preprocessing_fn on inline rows, with exact expected outputs (TFT's tft_unit
style)."""

import numpy as np
import tensorflow as tf
from tensorflow_transform.beam import tft_unit
from tensorflow_transform.tf_metadata import dataset_metadata

from pipelines.runner import launch
from transforms import census
from transforms import contract as contract_lib

AGES = list(range(1, 11))
WORKCLASS = ['Private'] * 5 + ['State-gov'] * 3 + [None] * 2
LABELS = ['>50K', '<=50K', '>50K.', '<=50K.', '<=50K'] * 2


def _raw_rows():
  rows = []
  for age, work, label in zip(AGES, WORKCLASS, LABELS):
    row = {key: age * 10 for key in census.NUMERIC_FEATURE_KEYS}
    row['age'] = age
    row.update({key: [work] if work else [] for key in census.CATEGORICAL_FEATURE_KEYS})
    row[census.LABEL_KEY] = label
    rows.append(row)
  return rows


class CensusTransformTest(tft_unit.TransformTestCase):

  def test_preprocessing_fn(self):
    ages = np.array(AGES, np.float64)
    zscore = (ages - ages.mean()) / ages.std()  # population std, as TFT computes it
    expected = []
    for i, (work, label) in enumerate(zip(WORKCLASS, LABELS)):
      row = {census.transformed_name(k): zscore[i] for k in census.NUMERIC_FEATURE_KEYS}
      # Ten distinct values in ten quantile buckets: one value per bucket, in order.
      row.update({census.bucket_name(k): i for k in census.BUCKET_FEATURE_KEYS})
      # Vocabulary by descending frequency; missing values take the OOV bucket (id 2).
      work_id = {'Private': 0, 'State-gov': 1, None: 2}[work]
      row.update({census.transformed_name(k): work_id for k in census.CATEGORICAL_FEATURE_KEYS})
      row[census.transformed_name(census.LABEL_KEY)] = int(label.startswith('>50K'))
      expected.append(row)
    metadata = dataset_metadata.DatasetMetadata.from_feature_spec(
        contract_lib.load('transforms.census').schema_feature_spec)
    self.assertAnalyzeAndTransformResults(
        _raw_rows(), metadata, census.preprocessing_fn, expected,
        expected_vocab_file_contents={
            key: [b'Private', b'State-gov'] for key in census.CATEGORICAL_FEATURE_KEYS},
        beam_pipeline=launch.make_pipeline([]))


def test_contract_loads_and_declares_every_column():
  contract = contract_lib.load('transforms.census')
  assert contract.label_key == 'income_bracket'
  assert set(contract.raw_feature_spec) == set(census.CSV_COLUMNS)
  assert contract.na_values == ('?',)
  varlen = {c.name for c in contract.columns if c.varlen}
  assert varlen == set(census.CATEGORICAL_FEATURE_KEYS)
  assert all(isinstance(s, tf.io.VarLenFeature) for k, s in contract.raw_feature_spec.items()
             if k in varlen)
