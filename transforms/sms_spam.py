"""SMS Spam Collection (data/sms_spam): is a text message spam? The text recipe on real data.

  python -m pipelines.tabular --transforms transforms.sms_spam \\
      --train data/sms_spam/sms_spam.csv --eval-fraction 0.2 --output out/sms_spam

The file has a header row (`text,label,source_line`); the model sees the message's TF-IDF
weighted words (transforms/text.py) and its length, and serves raw text.
"""

import tensorflow as tf
import tensorflow_transform as tft

from transforms import text

LABEL_KEY = 'label'
# A vocabulary of the label (file `label`, most frequent first: ham, spam) names the classes.
RAW_FEATURE_SPEC = {
    'text': tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.string),
}
TOP_K = 3000  # of about 8,000 distinct tokens; rarer ones share the OOV id
WEIGHTED_FEATURES = {'text_ids_xf': 'text_weights_xf'}


def preprocessing_fn(inputs):
  ids, weights = text.tfidf_features(inputs['text'], 'text', top_k=TOP_K)
  return {
      'text_ids_xf': ids,
      'text_weights_xf': weights,
      'text_length_xf': tft.scale_to_z_score(tf.math.log1p(text.token_counts(inputs['text']))),
      'label_xf': tft.compute_and_apply_vocabulary(inputs[LABEL_KEY], vocab_filename=LABEL_KEY),
  }
