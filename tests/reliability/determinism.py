"""Bit-level fingerprints of everything refnorm computes for a seed.

:func:`fingerprint` runs the forward and the backward (random ``dy`` from a fixed seed) of every
registered variant on all of its sample and oracle inputs and returns one SHA-256 per case, over
the bytes (and dtype and shape) of ``y``, the new state and every gradient. The same seed must
give the same fingerprints in the same process, in another process, and under another
``PYTHONHASHSEED`` (set and dict iteration order must not leak into any result).

``python tests/reliability/determinism.py [seed]`` prints them as JSON (used by the test through
a subprocess).
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
import zlib

import numpy as np


def _update(h, value):
    if value is None:
        h.update(b"None")
        return
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        for k, v in value._asdict().items():
            h.update(k.encode())
            _update(h, v)
        return
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            _update(h, value[k])
        return
    a = np.ascontiguousarray(np.asarray(value))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def fingerprint(seed=1234, kinds=("sample_inputs", "oracle_inputs")) -> dict:
    from refnorm.norms import ALL_SPECS

    out = {}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for spec in ALL_SPECS:
            for kind in kinds:
                make = getattr(spec, kind)
                if make is None:
                    continue
                for sample in make(np.random.default_rng(seed)):
                    h = hashlib.sha256()
                    y, state, cache = spec.run(sample)
                    key = f"{spec.name}/{kind}/{sample.name}"
                    rng = np.random.default_rng(zlib.crc32(key.encode()) ^ seed)
                    dy = spec.upstream(rng.standard_normal(v.shape).astype(v.dtype)
                                       for v in spec.output_values(y))
                    for part in (y, state, spec.backward(dy, cache)):
                        _update(h, part)
                    out[key] = h.hexdigest()
    return out


if __name__ == "__main__":  # pragma: no cover - run by the test in a subprocess
    print(json.dumps(fingerprint(int(sys.argv[1]) if len(sys.argv) > 1 else 1234),
                     sort_keys=True))
