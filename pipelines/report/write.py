"""Writing the report of a run: reads what the run produced (statistics files, samples, the
transform output, the first dead letters), writes statistics/summary.json and report.html into
its staged output, and lists them in the manifest."""

import json

from pipelines import output_dir, statistics
from pipelines.report import constants, images, page, summary
from pipelines.sinks import dead_letters as dead_letter_files
from transforms import run_contract

REPORT = run_contract.REPORT
SUMMARY = run_contract.SUMMARY
REFERENCE = 'reference'  # summary.json's key for an earlier run's train statistics


def write_report(out, manifest, options, reference=None):
  """Writes statistics/summary.json and report.html into the staged output of `out` (an
  output_dir.OutputDir) and returns the run_contract.Manifest with both, and the statistics
  files, listed. `options` are the report's flags (flags.Options). `reference`: for a
  transform-only run, the earlier run whose train statistics its split's drift is measured
  against."""
  import tensorflow_transform as tft
  splits = summary.ordered_splits(manifest.splits)
  files = {split: {stage: run_contract.statistics_file(split, stage) for stage in statistics.STAGES}
           for split in splits}
  datasets = {stage: {split: statistics.read_statistics(
      statistics.statistics_path(out.out, split, stage)) for split in splits}
              for stage in statistics.STAGES}
  compare = {}
  if reference is not None:  # the earlier run's train split, beside this run's only split
    for stage in statistics.STAGES:
      datasets[stage][REFERENCE] = statistics.read_statistics(
          statistics.statistics_path(reference, 'train', stage))
    compare = {'compared': splits[0], 'reference': f'train of {reference}',
               'reference_split': REFERENCE}
  tft_output = tft.TFTransformOutput(out.out)
  thresholds = {'numeric_js': options.numeric_threshold,
                'categorical_linf': options.categorical_threshold}
  result = summary.summarize(datasets, tft_output, summary.vocabulary_names(out.out),
                             constants.analyzer_constants(out.out), thresholds, **compare)
  # One line: json's C encoder writes no indentation, and the indenting one is Python (0.65 s
  # for a 300-column table's 2 MB summary, 0.09 s without).
  output_dir.write_text(output_dir.join(out.out, SUMMARY),
                        json.dumps(result, sort_keys=True) + '\n')
  drifts = result['drift']['features']
  manifest = manifest.replace(statistics={
      'files': files, 'summary': SUMMARY,
      'drifting_features': sorted(k for k, v in drifts.items() if v['drifting'])}, report=REPORT)
  samples = {split: {stage: statistics.read_sample(statistics.sample_path(out.staging, split,
                                                                          stage))
                     for stage in statistics.STAGES} for split in splits}
  dead_letters = {}  # {split: {kind: [(where, reason, record)]}}, as the printed summary has them
  for split, c in manifest.splits.items():
    if c.rows_rejected:
      examples = dead_letter_files.dead_letter_examples(out.errors_path(split), c.rejected_by_kind)
      dead_letters[split] = {kind: [(dead_letter_files.where(e), e.get('reason', ''), e.get('raw'))
                                    for e in found] for kind, found in examples.items()}
  html = page.render(manifest, result, out.directory, dead_letters,
                     images.sample_images(samples, tft_output, manifest))
  output_dir.write_text(output_dir.join(out.out, REPORT), html)
  return manifest
