"""transforms.earthquakes with its label transformed for training: the magnitude on a unit
scale under a name of its own (TRANSFORMED_LABEL_KEY), mapped back by inverse_label_fn, so the
exported model serves magnitudes."""


from transforms import earthquakes
from transforms.earthquakes import LABEL_KEY, RAW_FEATURE_SPEC, WEIGHTED_FEATURES  # noqa: F401

SHIFT, SCALE = 1.5, 1.25
TRANSFORMED_LABEL_KEY = 'magnitude_scaled'


def preprocessing_fn(inputs):
  outputs = earthquakes.preprocessing_fn(inputs)
  del outputs['mag_xf']
  outputs[TRANSFORMED_LABEL_KEY] = (inputs[LABEL_KEY] - SHIFT) / SCALE
  return outputs


def inverse_label_fn(y):
  return y * SCALE + SHIFT
