"""Image classification: decode, resize, per-channel statistics and the label vocabulary.

The image pipeline (`python -m pipelines.images`) feeds two raw features: `image` (the encoded JPEG
or PNG bytes) and `label` (the class name). `make_preprocessing_fn(height, width, channels)` builds
the preprocessing_fn for the configured size; decoding and resizing are ops of the transform graph,
so an exported model applies exactly these steps to the encoded images it is sent.

Outputs, and why this dtype is stored:
  image_xf       int64 [H, W, C], pixel values 0..255 after decode and resize (rounded). Stored as
                 integers, not as normalized float32: a tf.train.Example int64_list takes 1 byte
                 per value below 128 and 2 above (varint), a float_list 4, and small integers
                 compress far better under gzip; the model scales and normalizes them on the fly.
  image_mean_xf  float32 [C], mean of each channel over the whole training split (pixels / 255),
  image_std_xf   float32 [C], its standard deviation: both analyzed by TF Transform, repeated in
                 every example (a few bytes, which gzip all but removes) so that the model can
                 normalize with the training statistics and carries them into the export.
  label_xf       int64, the label's id in the vocabulary file `label` (most frequent first).
"""

import tensorflow as tf
import tensorflow_transform as tft

IMAGE_KEY = 'image'
LABEL_KEY = 'label'
RAW_FEATURE_SPEC = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.string),
}
DEFAULT_SIZE = (28, 28)
DEFAULT_CHANNELS = 1
_MIN_STD = 1e-3  # a constant channel (e.g. an all-black dataset) is not divided by zero


def decode_and_resize(encoded, height, width, channels):
  """[batch] encoded JPEG/PNG bytes -> [batch, height, width, channels] uint8.

  Grayscale and RGB(A) inputs are converted to `channels` by the decoder; images already of the
  target size are not resampled; others are resized with antialiased bilinear filtering.
  """

  def one(data):
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])

    def resize():
      resized = tf.image.resize(image, [height, width], method='bilinear', antialias=True)
      return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
    # reshape, not ensure_shape: TF Transform's (TF1) graph checks the untaken branch's shape too
    return tf.cond(same, lambda: tf.reshape(image, [height, width, channels]), resize)

  return tf.map_fn(one, encoded, fn_output_signature=tf.TensorSpec(
      [height, width, channels], tf.uint8))


def make_preprocessing_fn(height=DEFAULT_SIZE[0], width=DEFAULT_SIZE[1],
                          channels=DEFAULT_CHANNELS):

  def preprocessing_fn(inputs):
    encoded = tf.reshape(inputs[IMAGE_KEY], [-1])
    pixels = decode_and_resize(encoded, height, width, channels)
    scaled = tf.reshape(tf.cast(pixels, tf.float32) / 255.0, [-1, channels])
    mean = tft.mean(scaled, reduce_instance_dims=False)
    std = tf.maximum(tf.sqrt(tft.var(scaled, reduce_instance_dims=False)), _MIN_STD)
    batch = tf.shape(encoded)[:1]
    outputs = {
        'image_xf': tf.cast(pixels, tf.int64),
        'image_mean_xf': tf.tile(tf.reshape(mean, [1, channels]), tf.concat([batch, [1]], 0)),
        'image_std_xf': tf.tile(tf.reshape(std, [1, channels]), tf.concat([batch, [1]], 0)),
    }
    if LABEL_KEY in inputs:  # absent at serving time
      outputs['label_xf'] = tft.compute_and_apply_vocabulary(
          tf.reshape(inputs[LABEL_KEY], [-1]), vocab_filename=LABEL_KEY)
    return outputs

  return preprocessing_fn


preprocessing_fn = make_preprocessing_fn()
