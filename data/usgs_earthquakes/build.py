#!/usr/bin/env python3
"""Build data/usgs_earthquakes/usgs_earthquakes.csv from the USGS earthquake feed
snapshot shipped in the npm package ``vega-datasets@3.2.1`` (``data/earthquakes.json``).

SOURCE is the npm tarball (``vega-datasets-3.2.1.tgz``, read with tarfile; member
``package/data/earthquakes.json``) or the extracted ``earthquakes.json`` (GeoJSON,
USGS "all earthquakes, past week" feed generated 2018-02-07).

One row per feature (1,707), shuffled with ``random.Random(SEED)``. Columns
(names as in USGS's own CSV export where one exists):

  id         USGS event id (string)
  time       origin time, ISO 8601 UTC with milliseconds (string)
  latitude, longitude, depth   from the geometry; depth in km (float)
  mag        magnitude: the regression target (float)
  magType    magnitude type: ml, md, mb, mww, ... (categorical)
  nst        number of stations used (int, empty when unknown)
  gap        azimuthal gap, degrees (float, empty when unknown)
  dmin       distance to nearest station, degrees (float, empty when unknown)
  rms        travel-time residual, s (float, empty when unknown)
  net        contributing network: ci, nc, ak, ... (categorical)
  type       earthquake / explosion / quarry blast (categorical)
  status     automatic / reviewed (categorical)
  tsunami    0/1 flag (int)
  sources    networks that reported the event, '|'-separated (multi-valued)
  types      product types available for the event, '|'-separated (multi-valued)
  place      the feed's place description (string)
  region     derived: the text after the last ', ' in place (the whole place when
             there is no comma), with 'CA' -> 'California' and 'MX' -> 'Mexico'
             (categorical)

Dropped on purpose: sig, title, felt, cdi, mmi, alert (computed from or reported
because of the magnitude, so they would leak the target), and url, detail, code,
ids, updated, tz (bookkeeping). Floats are written with Python's repr (shortest
round-trip form), so 2 in the JSON becomes 2.0. CSV: UTF-8, header row, csv
module's minimal quoting, '\\n' line ends. Standard library only.

Get the source and rebuild (from the repository root):

    (cd /tmp && npm pack vega-datasets@3.2.1)
    python3 data/usgs_earthquakes/build.py /tmp/vega-datasets-3.2.1.tgz

Exit status: 0 on success, 2 on a missing source or bad arguments, 1 on malformed data.
"""
import argparse
import csv
import datetime
import io
import json
import os
import random
import sys
import tarfile

MEMBER = "package/data/earthquakes.json"
SEED = 42
COLUMNS = ["id", "time", "latitude", "longitude", "depth", "mag", "magType", "nst",
           "gap", "dmin", "rms", "net", "type", "status", "tsunami", "sources",
           "types", "place", "region"]
REGION_NAMES = {"CA": "California", "MX": "Mexico"}


def read_source(path):
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            return json.load(tf.extractfile(MEMBER))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fnum(v):
    return "" if v is None else repr(float(v))


def inum(v):
    return "" if v is None else str(int(v))


def multi(v):
    # ",geoserve,origin,phase-data," -> "geoserve|origin|phase-data"
    return "|".join(p for p in (v or "").split(",") if p)


def region(place):
    r = place.rsplit(", ", 1)[1] if ", " in place else place
    return REGION_NAMES.get(r, r)


def iso_utc(ms):
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_row(feature):
    p = feature["properties"]
    lon, lat, depth = feature["geometry"]["coordinates"]
    if p["mag"] is None:
        raise ValueError(f"{feature['id']}: no magnitude")
    return [feature["id"], iso_utc(p["time"]), fnum(lat), fnum(lon), fnum(depth),
            fnum(p["mag"]), p["magType"], inum(p["nst"]), fnum(p["gap"]),
            fnum(p["dmin"]), fnum(p["rms"]), p["net"], p["type"], p["status"],
            inum(p["tsunami"]), multi(p["sources"]), multi(p["types"]), p["place"],
            region(p["place"])]


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="vega-datasets-3.2.1.tgz, or the extracted earthquakes.json")
    ap.add_argument("--out", default=os.path.join(here, "usgs_earthquakes.csv"))
    args = ap.parse_args(argv)
    if not os.path.isfile(args.source):
        print(f"source not found: {args.source}", file=sys.stderr)
        return 2
    try:
        rows = [to_row(f) for f in read_source(args.source)["features"]]
    except (KeyError, TypeError, ValueError) as e:
        print(f"malformed source: {e!r}", file=sys.stderr)
        return 1
    random.Random(SEED).shuffle(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
