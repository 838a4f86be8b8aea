"""The text recipe: raw strings -> tokens -> a vocabulary of the most frequent ones -> TF-IDF.

Use it in a preprocessing_fn (transforms/sms_spam.py does):

  ids, weights = text.tfidf_features(inputs['text'], 'text', top_k=5000)
  outputs['text_ids_xf'], outputs['text_weights_xf'] = ids, weights
  WEIGHTED_FEATURES = {'text_ids_xf': 'text_weights_xf'}   # at module level

Every step is a TensorFlow op inside the transform graph, so the exported model takes raw text and
tokenizes it exactly as the pipeline did:

  normalize  lower case (Unicode-aware), every run of characters that are neither letters nor
             digits becomes one space (punctuation splits words, as in TF Transform's sentiment
             example)
  tokenize   split on spaces: a SparseTensor [batch, None] of tokens (empty text: no tokens)
  vocabulary the `top_k` most frequent tokens of the train split (a file named `vocab_filename`),
             tokens seen fewer than `frequency_threshold` times left out; every other token
             goes to one of `num_oov_buckets` out-of-vocabulary ids
  tfidf      per document, each distinct id and its TF-IDF weight (tft.tfidf: term frequency in
             the document times log((1 + documents) / (1 + documents with the term)) + 1)

The weights pair with the ids through WEIGHTED_FEATURES (trainer.features). tft.tfidf records no
domain for its ids, so the trainer sizes their embedding from the train split's largest id (later
ids past it share one row). bag_of_words() gives the vocabulary ids alone, with their domain (a
multivalent feature, averaged by the model), where weights are not wanted.
"""

import tensorflow as tf
import tensorflow_transform as tft

DEFAULT_TOP_K = 5000
DEFAULT_OOV_BUCKETS = 1


def normalize(text):
  """[batch] strings -> lower case, runs of non-alphanumerics as one space, trimmed."""
  lowered = tf.strings.lower(text, encoding='utf-8')
  return tf.strings.strip(tf.strings.regex_replace(lowered, r'[^\p{L}\p{N}]+', ' '))


def tokenize(text):
  """[batch] strings -> SparseTensor [batch, None] of normalized tokens."""
  return tf.strings.split(normalize(text)).to_sparse()


def token_counts(text):
  """[batch] strings -> [batch] float32 numbers of tokens."""
  return tf.cast(tf.strings.split(normalize(text)).row_lengths(), tf.float32)


def bag_of_words(text, vocab_filename, top_k=DEFAULT_TOP_K, num_oov_buckets=DEFAULT_OOV_BUCKETS,
                 frequency_threshold=None):
  """[batch] strings -> SparseTensor of vocabulary ids (one per token, repeats kept); the
  vocabulary is analyzed over the train split. Returns (ids, number of ids)."""
  ids = tft.compute_and_apply_vocabulary(
      tokenize(text), top_k=top_k, frequency_threshold=frequency_threshold,
      num_oov_buckets=num_oov_buckets, vocab_filename=vocab_filename)
  return ids, top_k + num_oov_buckets


def tfidf_features(text, vocab_filename, top_k=DEFAULT_TOP_K, num_oov_buckets=DEFAULT_OOV_BUCKETS,
                   frequency_threshold=None):
  """[batch] strings -> (ids, weights): two SparseTensors of the same shape, each document's
  distinct vocabulary ids and their TF-IDF weights. Pair them in WEIGHTED_FEATURES."""
  ids, size = bag_of_words(text, vocab_filename, top_k, num_oov_buckets, frequency_threshold)
  return tft.tfidf(ids, size, name=f'{vocab_filename}_tfidf')
