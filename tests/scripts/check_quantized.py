#!/usr/bin/env python3
"""Independent check of `fp8pipe quantize` output, driven by quantize_safetensors_test.sh.

  check_quantized.py make DIR        writes DIR/in_np.safetensors (safetensors.numpy.save_file) and
                                     DIR/in_bf16.safetensors (safetensors.serialize_file: numpy has
                                     no bfloat16, so BF16 goes in as raw uint16 bits)
  check_quantized.py check IN OUT --granularity G --format F --scales S [--skip REGEX]

The OUTPUT is loaded with the standard safetensors package only. Its numpy API (0.8.0) cannot
materialise F8_* tensors (it looks up numpy.float8_e4m3fn, which numpy lacks), so:
  * safe_open(OUT, framework="numpy") gives the keys, metadata, every dtype/shape (get_slice) and
    the F32 scales and other native tensors (get_tensor);
  * safetensors.deserialize(bytes) gives the raw FP8 bytes with dtype and shape.
FP8 codes are then decoded and re-encoded by the independent reference below, written from the
format definitions (OCP E4M3: bias 7, 0x7F/0xFF NaN, no Inf; E5M2: IEEE-like, bias 15) and FP8.md
§2.2 (scales) and §4 (RNE + SATFINITE).
"""
import argparse
import math
import re
import sys

try:
    import numpy as np
    import safetensors
    from safetensors import safe_open
    from safetensors.numpy import save_file
except ImportError as e:  # the setup script installs requirements-test.txt
    sys.exit(f"FAIL: {e}; install the test dependencies: pip install -r requirements-test.txt "
             f"(launch/setup.sh does this)")

FORMATS = {  # man bits, bias, max finite code, safetensors dtype, max finite value
    "e4m3": dict(man=3, bias=7, max_code=0x7E, dtype="F8_E4M3", fmax=448.0),
    "e5m2": dict(man=2, bias=15, max_code=0x7B, dtype="F8_E5M2", fmax=57344.0),
}
SUFFIX = "_scale_inv"
FLOATS = ("F32", "BF16", "F16", "F64")


# --------------------------------------------------------------------------------------------
# Reference FP8 codec (float64, from the definition).

def decode_table(fmt):
    """float64 value of each of the 256 codes."""
    f = FORMATS[fmt]
    m, bias = f["man"], f["bias"]
    out = np.empty(256)
    for c in range(256):
        s, e, frac = c >> 7, (c >> m) & ((1 << (7 - m)) - 1), c & ((1 << m) - 1)
        emax_field = (1 << (7 - m)) - 1
        if fmt == "e4m3" and e == emax_field and frac == (1 << m) - 1:
            v = math.nan
        elif fmt == "e5m2" and e == emax_field:
            v = math.inf if frac == 0 else math.nan
        elif e == 0:
            v = math.ldexp(frac, 1 - bias - m)
        else:
            v = math.ldexp((1 << m) + frac, e - bias - m)
        out[c] = -v if s else v
    return out


def encode(y, fmt):
    """float64 array -> codes: round to nearest, ties to even code, saturate, NaN -> 0x7F."""
    f = FORMATS[fmt]
    pos = decode_table(fmt)[: f["max_code"] + 1]  # non-negative finite values, increasing
    a = np.abs(y)
    hi = np.clip(np.searchsorted(pos, a), 0, len(pos) - 1)  # first value >= a (or the max)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(a >= pos[-1], len(pos) - 1, np.where(pick_hi, hi, lo)).astype(np.uint8)
    code |= np.where(np.signbit(y), 0x80, 0).astype(np.uint8)
    return np.where(np.isnan(y), 0x7F, code).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Reference scales (FP8.md §2.2) and the logical scale layout.

def group_amax(x2, gran):
    """Exact amax per group over |x| in the logical scale shape (NaN/Inf -> NaN)."""
    r, c = x2.shape
    rb, kb = -(-r // 128), -(-c // 128)
    a = np.abs(x2.astype(np.float64))
    a = np.where(np.isfinite(a), a, np.nan)
    p = np.zeros((rb * 128, kb * 128))
    p[:r, :c] = a
    if gran == "1x128":
        return p[:r].reshape(r, kb, 128).max(axis=2)
    if gran == "128x1":
        return p[:, :c].reshape(rb, 128, c).max(axis=1)
    if gran == "128x128":
        return p.reshape(rb, 128, kb, 128).max(axis=(1, 3))
    return np.array(a.max())


def expected_scales(amax, fmt, scales):
    a = np.maximum(amax.astype(np.float32), np.float32(1e-4))  # NaN stays NaN
    t = (a / np.float32(FORMATS[fmt]["fmax"])).astype(np.float32)
    if scales == "fp32":
        return t
    mant, exp = np.frexp(t.astype(np.float64))  # t = mant * 2^exp, mant in [0.5, 1)
    pow2 = np.where(mant == 0.5, t, np.ldexp(1.0, exp))  # ceil to a power of two
    return np.where(np.isnan(t), np.nan, pow2).astype(np.float32)


def expand(s, gran, r, c):
    """Per-element scale from the logical scale array."""
    if gran == "1x128":
        return np.repeat(s, 128, axis=1)[:, :c]
    if gran == "128x1":
        return np.repeat(s, 128, axis=0)[:r]
    if gran == "128x128":
        return np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:r, :c]
    return np.full((r, c), s.reshape(()))


def scale_shape(gran, r, c):
    rb, kb = -(-r // 128), -(-c // 128)
    return {"1x128": [r, kb], "128x1": [rb, c], "128x128": [rb, kb], "tensor": []}[gran]


# --------------------------------------------------------------------------------------------

def fail(msg):
    sys.exit(f"FAIL: {msg}")


def input_as_f32(spec):
    """Input tensor -> float32 array, as fp8pipe feeds the kernel."""
    raw, dt = bytes(spec["data"]), spec["dtype"]
    if dt == "BF16":
        bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dt]).astype(np.float32)


def check_tensor(name, x, q, s, args, errors):
    f = FORMATS[args.format]
    r, c = x.shape
    amax = group_amax(x, args.granularity)
    want_s = expected_scales(amax, args.format, args.scales)
    if not np.array_equal(s, want_s, equal_nan=True):
        errors.append(f"{name}: scales differ from the FP8.md §2.2 reference at "
                      f"{np.argwhere(~((s == want_s) | (np.isnan(s) & np.isnan(want_s))))[:3].tolist()}")
        return
    if args.scales == "pow2":
        fin = s[np.isfinite(s)]
        if not np.all(np.frexp(fin.astype(np.float64))[0] == 0.5):
            errors.append(f"{name}: pow2 scales that are not powers of two")
    se = expand(s.astype(np.float64), args.granularity, r, c)
    x64 = x.astype(np.float64)
    if args.scales == "pow2":
        y = x64 / se  # exact: a power-of-two scale
    else:  # the spec's one f32 multiply by inv = f32(1/sf)
        inv = (np.float32(1) / expand(s, args.granularity, r, c)).astype(np.float32)
        y = (x * inv).astype(np.float32).astype(np.float64)
    want_q = np.where(np.isnan(se), 0x7F, encode(y, args.format)).astype(np.uint8)
    bad = np.argwhere(q != want_q)
    if len(bad):
        i, j = bad[0]
        errors.append(f"{name}: {len(bad)} codes differ from the reference encoding, first at "
                      f"[{i},{j}]: x={x[i, j]!r} scale={se[i, j]!r} got 0x{q[i, j]:02x} "
                      f"want 0x{want_q[i, j]:02x}")
    ok = np.isfinite(se)
    dq = decode_table(args.format)[q] * se
    bound = np.maximum(np.abs(x64) * 2.0 ** -(f["man"] + 1),
                       se * 2.0 ** (1 - f["bias"] - f["man"] - 1)) * (1 + 2 ** -20)
    over = ok & ~(np.abs(dq - x64) <= bound)
    if over.any():
        errors.append(f"{name}: {int(over.sum())} decoded values outside the {args.format} bound")


def load_output(path):
    """The output through the standard package: safe_open for metadata/native tensors,
    deserialize for the FP8 bytes. Returns ({name: (dtype, shape, bytes)}, metadata, handle data)."""
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        info = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
        native = {k: f.get_tensor(k) for k, (dt, _) in info.items() if dt in ("F32", "I32", "U8")}
    with open(path, "rb") as fh:
        raw = {k: v for k, v in safetensors.deserialize(fh.read())}
    for k, (dt, shape) in info.items():
        if raw[k]["dtype"] != dt or list(raw[k]["shape"]) != shape:
            fail(f"{path}: safe_open and deserialize disagree on {k}")
    return raw, meta, native


def check(args):
    with open(args.input, "rb") as fh:
        inp = {k: v for k, v in safetensors.deserialize(fh.read())}
    with safe_open(args.input, framework="numpy") as f:
        in_meta = f.metadata() or {}
    out, meta, native = load_output(args.output)
    f = FORMATS[args.format]
    want_meta = {"fp8pipe.quant.granularity": args.granularity, "fp8pipe.quant.format": args.format,
                 "fp8pipe.quant.scales": args.scales, "fp8pipe.quant.scale_suffix": SUFFIX}
    for k, v in list(in_meta.items()) + list(want_meta.items()):
        if meta.get(k) != v:
            fail(f"{args.output}: metadata {k!r} is {meta.get(k)!r}, want {v!r}")
    skip = re.compile(args.skip) if args.skip else None
    errors, expected_names, nq = [], set(), 0
    for name, spec in inp.items():
        expected_names.add(name)
        shape, n = list(spec["shape"]), math.prod(spec["shape"])
        quantize = (spec["dtype"] in FLOATS and len(shape) >= 1 and n > 0
                    and not (skip and skip.search(name)))
        o = out.get(name)
        if o is None:
            fail(f"{args.output}: tensor {name} missing")
        if not quantize:
            if o["dtype"] != spec["dtype"] or list(o["shape"]) != shape or o["data"] != spec["data"]:
                errors.append(f"{name}: should have been copied unchanged")
            continue
        nq += 1
        sname = name + SUFFIX
        expected_names.add(sname)
        r, c = n // shape[-1], shape[-1]
        if o["dtype"] != f["dtype"] or list(o["shape"]) != shape:
            fail(f"{name}: got {o['dtype']} {o['shape']}, want {f['dtype']} {shape}")
        if sname not in native or out[sname]["dtype"] != "F32":
            fail(f"{sname}: missing or not F32")
        s = native[sname]
        if list(s.shape) != scale_shape(args.granularity, r, c):
            fail(f"{sname}: shape {list(s.shape)}, want {scale_shape(args.granularity, r, c)}")
        q = np.frombuffer(bytes(o["data"]), np.uint8).reshape(r, c)
        check_tensor(name, input_as_f32(spec).reshape(r, c), q, s, args, errors)
    if set(out) != expected_names:
        fail(f"{args.output}: unexpected tensors {sorted(set(out) ^ expected_names)}")
    if errors:
        fail("\n  ".join(errors))
    print(f"ok: {args.output}: {nq} tensors quantized, {len(inp) - nq} copied "
          f"({args.granularity}, {args.format}, {args.scales})")


# --------------------------------------------------------------------------------------------
# Inputs.

def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make(d):
    rng = np.random.default_rng(1234)
    # Rows and columns of very different magnitudes, so each granularity picks different scales.
    w = (rng.standard_normal((300, 257)) * 10.0 ** rng.uniform(-3, 3, (300, 1))
         * 10.0 ** rng.uniform(-2, 2, (1, 257))).astype(np.float32)
    w[0, :5] = [0.0, -0.0, 1e-42, -3e-39, 5e-30]  # signed zero, f32 subnormals, tiny values
    nan = rng.standard_normal((130, 140)).astype(np.float32)
    nan[5, 7], nan[129, 139] = np.nan, -np.inf
    tensors = {
        "layers.0.w": w,
        "layers.0.x3d": rng.standard_normal((3, 5, 130)).astype(np.float32),
        "vec": (rng.standard_normal(200) * 1e4).astype(np.float32),
        "one": np.array([[3.0]], np.float32),
        "zeros": np.zeros((129, 3), np.float32),
        "half": (rng.standard_normal((7, 129)) * 100).astype(np.float16),
        "double": rng.standard_normal((2, 131)) * 1e-3,
        "nonfinite": nan,
        "final_norm.weight": rng.standard_normal(257).astype(np.float32),  # --skip norm
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 7), np.float32),
        "ids": np.arange(12, dtype=np.int32).reshape(3, 4),
        "mask": np.array([1, 0, 1], np.uint8),
        "attn/\u00e9 \"q\"\\": rng.standard_normal((5, 3)).astype(np.float32),  # JSON escapes
    }
    save_file(tensors, f"{d}/in_np.safetensors", metadata={"source": "check_quantized.py"})
    # BF16 through the standard serializer (the same call save_file makes, with raw bits).
    keep = {"b.w": bf16_bits(rng.standard_normal((257, 300)) * 10.0 ** rng.uniform(-4, 4, (257, 1))),
            "b.v": bf16_bits(rng.standard_normal(129)),
            "b.f32": rng.standard_normal((129, 129)).astype(np.float32)}
    specs = {k: safetensors.TensorSpec(dtype="float32" if v.dtype == np.float32 else "bfloat16",
                                       shape=list(v.shape), data_ptr=v.ctypes.data,
                                       data_len=v.nbytes) for k, v in keep.items()}
    safetensors.serialize_file(specs, f"{d}/in_bf16.safetensors", metadata={"source": "bf16"})
    print(f"made {d}/in_np.safetensors and {d}/in_bf16.safetensors")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    c = sub.add_parser("check")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--granularity", required=True, choices=["1x128", "128x1", "128x128", "tensor"])
    c.add_argument("--format", required=True, choices=list(FORMATS))
    c.add_argument("--scales", required=True, choices=["pow2", "fp32"])
    c.add_argument("--skip", default="")
    a = p.parse_args()
    if a.cmd == "make":
        make(a.dir)
    else:
        check(a)


if __name__ == "__main__":
    main()
