"""The stages of every pipeline's Beam graph, as named composite PTransforms, and the chain that
joins them (`add_preprocessing`):

  ReadTrain, ReadEval        a split's inputs -> Arrow RecordBatches and dead letters (ReadSplit)
  ReadTrainForAnalysis       the train split again, for the analysis alone (see add_preprocessing)
  AnalyzeTrain               TF Transform's analysis of the train split -> the transform graph
                             (written as a TF2 SavedModel in graph mode too: transform_graph)
  TransformAndWrite<Split>   the transform of a split -> its shards, dead letters and row counts
  Statistics<Split>          the statistics of a split, raw and transformed

add_transform_only joins ReadSplit, TransformAndWriteSplit and SplitStatistics for one split, with
the transform graph of an earlier run (pipelines.transform).

A source is any PTransform factory `source(units, split, eval_fraction, spill)` whose output is
(RecordBatches, carved eval RecordBatches or None, dead-letter dicts): sources/csv_files.ReadCsv,
sources/image_files.ReadImages.
"""

import apache_beam as beam
import tensorflow_transform.beam as tft_beam

from pipelines import (
  analysis_cache,
  analysis_graph,
  output_dir,
  statistics,
  transform_graph,
  vocabulary,
)
from pipelines.runner import progress
from pipelines.sinks import dead_letters, row_counts, tfrecords
from transforms.errors import UserError


class TraceError(UserError):
  """A preprocessing_fn that TF Transform could not trace."""


class ReadSplit(beam.PTransform):
  """A split's work units -> (RecordBatches, carved eval RecordBatches or None, dead letters),
  the RecordBatches counted for the progress line as rows of `stage` ('transform' or 'analyze';
  the carved eval rows only by the transform's read, which is the one that uses them)."""

  def __init__(self, source, units, split, eval_fraction=0.0, spill=None, stage='transform'):
    super().__init__()
    self._read = source(units, split, eval_fraction, spill)
    self._split = split
    self._stage = stage

  def expand(self, pbegin):
    rows, carved, errors = pbegin | 'Source' >> self._read
    rows = progress.count_batches(rows, self._stage, self._split)
    if carved is not None and self._stage == 'transform':
      carved = progress.count_batches(carved, self._stage, 'eval')
    return rows, carved, errors


class AnalyzeTrain(beam.PTransform):
  """The train split's RecordBatches -> TF Transform's transform_fn (also written to the staged
  output's transform_fn/). TF Transform traces the preprocessing_fn while this is applied: a
  function it cannot trace is a UserError of one line.

  With an analysis cache (`cache`, an analysis_cache.Plan), the input is {DatasetKey: the span's
  RecordBatches, or None for a span the analysis takes from the cache alone}: the cached spans'
  accumulators are read from the cache, the new ones written to the run's staging area."""

  def __init__(self, preprocessing_fn, adapter_config, out, cache=None, pipeline=None):
    super().__init__()
    self._fn = preprocessing_fn
    self._adapter_config = adapter_config
    self._out = out
    self._cache = cache
    self.pipeline = pipeline  # where every span comes from the cache, nothing else names it

  def _extract_input_pvalues(self, pvalueish):
    if isinstance(pvalueish, dict):  # the spans of a cached analysis; None: not read
      return pvalueish, [v for v in pvalueish.values() if v is not None]
    return super()._extract_input_pvalues(pvalueish)

  def expand(self, batches):
    vocabulary.install()
    try:
      if self._cache is None:
        transform_fn = ((batches, self._adapter_config)
                        | 'Analyze' >> tft_beam.AnalyzeDataset(self._fn))
      else:
        pipeline = self.pipeline
        input_cache = analysis_cache.read_cache(pipeline, self._cache)
        with analysis_cache.reusing_trace(self._fn, self._cache.traced), \
            analysis_graph.rewriting_output_cache(vocabulary.OUTPUT_CACHE_REWRITES):
          transform_fn, output_cache = (
              (batches, input_cache, self._adapter_config)
              | 'Analyze' >> tft_beam.AnalyzeDatasetWithCache(self._fn, pipeline=pipeline))
        self._cache.traced = None  # used (the analysis keeps what it needs of it)
        analysis_cache.write_cache(pipeline, output_cache, self._cache)
    except Exception as e:  # the user's function (a wrong key, an op on the wrong type, ...)
      raise TraceError(traced_failure(e, self._out)) from e
    written = transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(self._out.out)
    if tft_beam.Context.get_use_tf_compat_v1():  # graph mode wrote a TF1 graph
      _ = written | 'RewriteAsTF2' >> beam.Map(_rewrite_as_tf2, self._out.out, self._out.tmp,
                                               self._adapter_config,
                                               transform_graph.PROCESS_TOKEN)
    return transform_fn


def _rewrite_as_tf2(unused_done, directory, temp_dir, adapter_config, job_process):
  """transform_graph.rewrite_as_tf2 of the written transform graph: for a large graph, in a child
  process where this step runs in the process that runs the job (`job_process`, its
  transform_graph.PROCESS_TOKEN; job.publish waits for it before publishing); here elsewhere. A
  graph it cannot rewrite stays the TF1 one, which the trainer, the export and serving read too,
  with one warning."""
  if job_process == transform_graph.PROCESS_TOKEN and transform_graph.worth_a_child(directory):
    transform_graph.start_in_background(directory, adapter_config, temp_dir)
    return
  from tfx_bsl.tfxio import tensor_adapter
  try:
    transform_graph.rewrite_as_tf2(
        directory, tensor_adapter.TensorAdapter(adapter_config).OriginalTypeSpecs(), temp_dir)
  except Exception as e:  # an op or a composite the rewrite does not know
    transform_graph.warn_not_rewritten(f'{type(e).__name__}: {output_dir.error_cause(e)}')


def traced_failure(error, out):
  """One line on a preprocessing_fn that TF Transform could not trace; the traceback is kept
  in the staging area, as for a failed job."""
  hint = ''
  if 'invalid dtype' in str(error):
    hint = ('; outputs must be int64, float32 or string tensors (tf.strings.length and '
            'tf.argmax give int32, for one): cast them, e.g. tf.cast(x, tf.int64)')
  return (f'the preprocessing_fn could not be traced: {type(error).__name__}: '
          f'{output_dir.error_cause(error)}{hint}; {out.keep_traceback(error)}; '
          'nothing was published')


class TransformAndWriteSplit(beam.PTransform):
  """(raw RecordBatches, dead letters) of one split -> its transformed RecordBatches; writes the
  split's TFRecord shards, its dead letters and its row counts into the staged output."""

  def __init__(self, split, transform_fn, adapter_config, out, num_shards, compression):
    super().__init__()
    self._split = split
    self._transform_fn = transform_fn
    self._adapter_config = adapter_config
    self._out = out
    self._num_shards = num_shards
    self._compression = compression

  def expand(self, raw_and_errors):
    raw, errors = raw_and_errors
    split, out = self._split, self._out
    data, metadata = (((raw, self._adapter_config), self._transform_fn)
                      | 'Transform' >> tft_beam.TransformDataset(output_record_batches=True))
    written = data | 'WriteExamples' >> tfrecords.WriteExamples(
        out.split_prefix(split), self._num_shards, self._compression,
        output_dir.join(out.tmp, 'parts', split), metadata)
    rejected = errors | 'WriteErrors' >> dead_letters.WriteErrors(out.errors_path(split))
    rows_ok = (raw
               | 'Rows' >> beam.Map(lambda batch: batch.num_rows)
               | 'SumRows' >> beam.CombineGlobally(sum))
    _ = (rows_ok, written, rejected) | 'Count' >> row_counts.WriteCounts(
        output_dir.join(out.counts, f'{split}.json'))
    return data


class SplitStatistics(beam.PTransform):
  """(raw RecordBatches, transformed RecordBatches) of one split -> its statistics files (and
  sample rows) in the staged output; the report reads them."""

  def __init__(self, split, out):
    super().__init__()
    self._split = split
    self._out = out

  def expand(self, raw_and_transformed):
    for stage, batches in zip(statistics.STAGES, raw_and_transformed):
      _ = batches | stage.capitalize() >> statistics.WriteStatistics(
          f'{self._split}_{stage}', statistics.statistics_path(self._out.out, self._split, stage),
          statistics.sample_path(self._out.staging, self._split, stage))
    return beam.pvalue.PDone(raw_and_transformed[0].pipeline)


def add_analysis(pipeline, source, train_units, eval_fraction, preprocessing_fn, adapter_config,
                 out, spill=None, cache=None):
  """Adds the analysis of the train split to `pipeline` (its own read, then AnalyzeTrain);
  returns the transform_fn. With an analysis cache (`cache`: analysis_cache.Plan), each span the
  analysis needs is read on its own (one dataset key each), and no other."""
  if cache is None:
    analyzed, _, _ = pipeline | 'ReadTrainForAnalysis' >> ReadSplit(
        source, train_units, 'train', eval_fraction, spill, stage='analyze')
  else:
    analyzed = {}
    for i, span in enumerate(cache.spans):
      key = cache.keys[span.name]
      analyzed[key] = None
      if span.name in cache.to_read:
        analyzed[key], _, _ = pipeline | f'ReadSpan{i}ForAnalysis' >> ReadSplit(
            source, list(span.units), 'train', eval_fraction, None, stage='analyze')
  return analyzed | 'AnalyzeTrain' >> AnalyzeTrain(preprocessing_fn, adapter_config, out, cache,
                                                   pipeline)


def add_preprocessing(pipeline, source, units, eval_fraction, preprocessing_fn, adapter_config,
                      out, shards, compression, spill=None, cache=None):
  """Adds the whole job to `pipeline`: read every split, analyze the train split, transform and
  write every split, and their statistics. `units`: {split: work units}; with eval_fraction, the
  eval split is carved out of the train split's inputs. `shards`: {split: shard count}.

  The train split is read twice: once for the analysis alone, and once for the transform. On
  Beam's local runners a PCollection that two stages consume (analysis, then transform once the
  analysis is done) is held in memory in full between them; reading the input twice keeps memory
  flat whatever the data size, and costs less time than holding it
  (benchmarks/tabular_pipeline.py). Where the workers share this machine's disk, the second read
  does not parse again: it gives what the analysis's read spilled (`spill`: sources.reading.Spill,
  see job.make_spill).

  With an analysis cache (`cache`: analysis_cache.Plan) there is no spill (add_analysis).
  """
  raw, errors = {}, {}
  raw['train'], carved_eval, errors['train'] = pipeline | 'ReadTrain' >> ReadSplit(
      source, units['train'], 'train', eval_fraction, spill and spill.replaying())
  if eval_fraction:
    raw['eval'] = carved_eval
    errors['train'], errors['eval'] = (
        errors['train'] | 'SplitErrors' >> beam.Partition(
            lambda e, _: int(e['split'] == 'eval'), 2))
  elif 'eval' in units:
    raw['eval'], _, errors['eval'] = pipeline | 'ReadEval' >> ReadSplit(
        source, units['eval'], 'eval')
  # Only the rows and dead letters of the reads above are counted.
  transform_fn = add_analysis(pipeline, source, units['train'], eval_fraction, preprocessing_fn,
                              adapter_config, out, spill, cache)
  for split in raw:
    name = split.capitalize()
    transformed = ((raw[split], errors[split])
                   | f'TransformAndWrite{name}' >> TransformAndWriteSplit(
                       split, transform_fn, adapter_config, out, shards[split], compression))
    _ = (raw[split], transformed) | f'Statistics{name}' >> SplitStatistics(split, out)


def add_transform_only(pipeline, source, units, split, transform_fn_dir, adapter_config, out,
                       num_shards, compression):
  """Adds a transform-only job to `pipeline`: read one split, transform it with the transform
  graph of an earlier run (`transform_fn_dir`, a published output; no analysis), write its
  shards, dead letters, counts and statistics as add_preprocessing does."""
  name = split.capitalize()
  raw, _, errors = pipeline | f'Read{name}' >> ReadSplit(source, units, split)
  transform_fn = pipeline | 'ReadTransformFn' >> tft_beam.ReadTransformFn(transform_fn_dir)
  transformed = ((raw, errors)
                 | f'TransformAndWrite{name}' >> TransformAndWriteSplit(
                     split, transform_fn, adapter_config, out, num_shards, compression))
  _ = (raw, transformed) | f'Statistics{name}' >> SplitStatistics(split, out)
