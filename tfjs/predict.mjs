// Runs an exported TF.js graph model (python -m trainer.export_tfjs) in Node with @tensorflow/tfjs,
// pure JavaScript on its CPU backend: no native binary, no network.
//
//   node tfjs/predict.mjs DIR [--input FILE]
//
// DIR: a model's tfjs/ directory (model.json and its weight shards), or the version directory
// holding it. The request is JSON, from FILE or stdin, in TensorFlow Serving's two REST forms:
//   {"instances": [{"age": 39, "workclass": "State-gov", ...}, ...]}  -> {"predictions": [...]}
//   {"inputs": {"age": [39, 50], "workclass": [...], ...}}            -> {"outputs": {...}}
// Every raw feature of the model's predict_raw signature is required (a string '' is a missing
// value, as in the SavedModel). An image model takes its decoded pixels instead (input `pixels`,
// one [H, W, C] array of integers 0..255 per image, at the model's size):
//   {"instances": [{"pixels": [[[0], [12], ...], ...]}, ...]} The reply goes to stdout; a bad request or model is one line on
// stderr and exit status 2.

import fs from 'node:fs';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';

class RequestError extends Error {}

const INT32_MIN = -(2 ** 31);
const INT32_MAX = 2 ** 31 - 1;

function parseArgs(argv) {
  const args = {dir: null, input: null};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--input') {
      if (i + 1 >= argv.length) throw new RequestError('--input needs a file');
      args.input = argv[++i];
    } else if (argv[i].startsWith('-')) {
      throw new RequestError(`unknown flag ${argv[i]} (usage: predict.mjs DIR [--input FILE])`);
    } else if (args.dir === null) {
      args.dir = argv[i];
    } else {
      throw new RequestError(`one model directory only, got ${args.dir} and ${argv[i]}`);
    }
  }
  if (args.dir === null) throw new RequestError('usage: predict.mjs DIR [--input FILE]');
  return args;
}

function modelJsonPath(dir) {
  for (const candidate of [path.join(dir, 'model.json'), path.join(dir, 'tfjs', 'model.json')]) {
    if (fs.existsSync(candidate)) return candidate;
  }
  throw new RequestError(`${dir} holds no model.json (nor tfjs/model.json): export one with ` +
                         'python -m trainer.export_tfjs');
}

// An IOHandler reading model.json and its weight shards from the file system, so that the pure
// JavaScript package (whose own loaders fetch URLs) loads a model from disk.
function fileHandler(jsonPath) {
  const dir = path.dirname(jsonPath);
  return {
    async load() {
      const modelJSON = JSON.parse(fs.readFileSync(jsonPath, 'utf8'));
      return tf.io.getModelArtifactsForJSON(modelJSON, async (manifest) => {
        const shards = manifest.flatMap((group) => group.paths).map((p) => {
          const bytes = fs.readFileSync(path.join(dir, p));
          return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
        });
        return [tf.io.getWeightSpecs(manifest), tf.io.concatenateArrayBuffers(shards)];
      });
    },
  };
}

// The raw features the model takes: {name, dtype ('int32', 'float32', 'string', 'bool')}. The
// converter lists the hash tables' handles among the inputs too (DT_RESOURCE): the runtime feeds
// those itself, from the model's initializer.
function featureInputs(signature) {
  const types = {DT_INT64: 'int32', DT_INT32: 'int32', DT_FLOAT: 'float32', DT_DOUBLE: 'float32',
                 DT_STRING: 'string', DT_BOOL: 'bool'};
  const features = [];
  for (const [key, spec] of Object.entries(signature.inputs)) {
    if (spec.dtype === 'DT_RESOURCE') continue;
    if (!(spec.dtype in types)) throw new RequestError(`input ${key} has dtype ${spec.dtype}`);
    // the dimensions after the batch: [] for a raw feature, [H, W, C] for an image's pixels
    const dims = (spec.tensorShape?.dim ?? []).slice(1).map((d) => Number(d.size));
    features.push({name: key.replace(/:0$/, ''), tensor: spec.name, dtype: types[spec.dtype],
                   original: spec.dtype, dims});
  }
  return features.sort((a, b) => a.name.localeCompare(b.name));
}

function checkValue(value, feature, where) {
  if (feature.dtype === 'string') {
    if (typeof value !== 'string') {
      throw new RequestError(`${where}: '${feature.name}' takes a string, got ${JSON.stringify(value)}`);
    }
    return value;
  }
  if (feature.dtype === 'bool') {
    if (typeof value !== 'boolean') {
      throw new RequestError(`${where}: '${feature.name}' takes true or false, got ${JSON.stringify(value)}`);
    }
    return value;
  }
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new RequestError(`${where}: '${feature.name}' takes a number, got ${JSON.stringify(value)}`);
  }
  if (feature.dtype === 'int32') {
    if (!Number.isInteger(value)) {
      throw new RequestError(`${where}: '${feature.name}' takes an integer, got ${value}`);
    }
    if (value < INT32_MIN || value > INT32_MAX) {
      // TF.js has no int64 tensors: the converter made the model's int64 inputs int32.
      throw new RequestError(`${where}: '${feature.name}' = ${value} is outside the int32 range ` +
                             `that TF.js holds ${feature.original} values in`);
    }
  }
  return value;
}

// A value of a feature with dimensions after the batch: nested arrays of exactly those sizes
// (where the model fixes them), every element checked.
function checkNested(value, feature, where, depth = 0) {
  if (depth === feature.dims.length) return checkValue(value, feature, where);
  const size = feature.dims[depth];
  if (!Array.isArray(value) || (size > 0 && value.length !== size)) {
    const want = feature.dims.map((d) => (d > 0 ? d : '?')).join(' x ');
    const got = Array.isArray(value) ? `${value.length} values` : JSON.stringify(value);
    throw new RequestError(`${where}: '${feature.name}' takes nested arrays of ${want} values ` +
                           `(at depth ${depth + 1}: ${got} where ${size > 0 ? size : 'a list'} ` +
                           'was expected)');
  }
  return value.map((v) => checkNested(v, feature, where, depth + 1));
}

// {feature name: [values]} from either request form, every feature present, checked.
function columnsOf(request, features) {
  const known = new Set(features.map((f) => f.name));
  const columns = {};
  if (Array.isArray(request.instances)) {
    if (request.instances.length === 0) throw new RequestError('"instances" is empty');
    for (const f of features) columns[f.name] = [];
    request.instances.forEach((row, i) => {
      if (row === null || typeof row !== 'object' || Array.isArray(row)) {
        throw new RequestError(`instance ${i}: not an object of raw feature values`);
      }
      for (const key of Object.keys(row)) {
        if (!known.has(key)) throw new RequestError(`instance ${i}: unknown feature '${key}'`);
      }
      for (const f of features) {
        if (!(f.name in row) || row[f.name] === null) {
          throw new RequestError(`instance ${i}: no value for '${f.name}' (every raw feature is ` +
                                 'required; a string \'\' is a missing value)');
        }
        columns[f.name].push(checkNested(row[f.name], f, `instance ${i}`));
      }
    });
    return columns;
  }
  if (request.inputs !== null && typeof request.inputs === 'object' && !Array.isArray(request.inputs)) {
    for (const key of Object.keys(request.inputs)) {
      if (!known.has(key)) throw new RequestError(`unknown input '${key}'`);
    }
    let rows = null;
    for (const f of features) {
      const values = request.inputs[f.name];
      if (!Array.isArray(values)) throw new RequestError(`input '${f.name}': expected a list of values`);
      if (rows !== null && values.length !== rows) {
        throw new RequestError(`input '${f.name}' has ${values.length} values, others ${rows}`);
      }
      rows = values.length;
      columns[f.name] = values.map((v, i) => checkNested(v, f, `value ${i}`));
    }
    if (!rows) throw new RequestError('the inputs hold no values');
    return columns;
  }
  throw new RequestError('the request is neither {"instances": [...]} nor {"inputs": {...}}');
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const jsonPath = modelJsonPath(args.dir);
  let request;
  try {
    request = JSON.parse(fs.readFileSync(args.input ?? 0, 'utf8'));
  } catch (e) {
    throw new RequestError(`the request is not JSON: ${e.message}`);
  }
  if (request === null || typeof request !== 'object') {
    throw new RequestError('the request is neither {"instances": [...]} nor {"inputs": {...}}');
  }
  // Production mode only silences tfjs's console notes (here: its advice, on the first tensor, to
  // install the native Node backend, which this script does without on purpose).
  tf.enableProdMode();
  await tf.setBackend('cpu');
  const model = await tf.loadGraphModel(fileHandler(jsonPath));
  const features = featureInputs(model.modelSignature);
  const columns = columnsOf(request, features);
  const feeds = {};
  for (const f of features) {  // nested arrays: their shape is the tensor's
    feeds[f.tensor] = f.dims.length ? tf.tensor(columns[f.name], undefined, f.dtype)
                                    : tf.tensor1d(columns[f.name], f.dtype);
  }
  const names = Object.keys(model.modelSignature.outputs).sort();
  // execute(), unless the graph has dynamic-shape ops (Where, in a tabular model's transform),
  // which only executeAsync() runs (and which, on a graph without them, warns on stderr).
  const fetches = names.map((n) => model.modelSignature.outputs[n].name);
  let tensors;
  try {
    tensors = model.execute(feeds, fetches);
  } catch (e) {
    if (!/executeAsync/.test(e.message)) throw e;
    tensors = await model.executeAsync(feeds, fetches);
  }
  const outputs = {};
  for (const [i, name] of names.entries()) outputs[name] = await [].concat(tensors)[i].array();
  if (Array.isArray(request.instances)) {
    const predictions = request.instances.map((_, row) => {
      if (names.length === 1) return outputs[names[0]][row];
      return Object.fromEntries(names.map((name) => [name, outputs[name][row]]));
    });
    process.stdout.write(JSON.stringify({predictions}) + '\n');
  } else {
    process.stdout.write(JSON.stringify({outputs: names.length === 1 ? outputs[names[0]] : outputs}) + '\n');
  }
}

main().catch((e) => {
  const detail = e instanceof RequestError ? e.message : `${e.name}: ${e.message}`;
  process.stderr.write(`predict.mjs: ${detail.replace(/\s*\n\s*/g, ' ').trim()}\n`);
  process.exit(2);
});
