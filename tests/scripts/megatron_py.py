#!/usr/bin/env python3
"""Independent Megatron-LM indexed dataset (.bin/.idx, "MMIDIDX") writer and reader in plain
Python (struct only), used by tests/core/data_test.cc to check fp8pipe's reader and writer against
code that shares nothing with them.

  megatron_py.py write PREFIX DTYPE_CODE JSON   JSON: [[seq, seq, ...], ...] one list per document
  megatron_py.py read PREFIX                    prints {"dtype": code, "docs": [[seq, ...], ...]}
"""
import json
import struct
import sys

MAGIC = b"MMIDIDX\x00\x00"
# code -> struct format letter and size (little-endian), per Megatron-LM's DType enum.
FORMATS = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8), 8: ("H", 2)}


def write(prefix, code, docs):
    fmt, size = FORMATS[code]
    lengths, pointers, doc_indices = [], [], [0]
    offset = 0
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                f.write(struct.pack("<%d%s" % (len(seq), fmt), *seq))
                lengths.append(len(seq))
                pointers.append(offset)
                offset += len(seq) * size
            doc_indices.append(len(lengths))
    with open(prefix + ".idx", "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(struct.pack("<%di" % len(lengths), *lengths))
        f.write(struct.pack("<%dq" % len(pointers), *pointers))
        f.write(struct.pack("<%dq" % len(doc_indices), *doc_indices))


def read(prefix):
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    assert idx[:9] == MAGIC, "bad magic"
    (version,) = struct.unpack_from("<Q", idx, 9)
    assert version == 1, "bad version"
    code = idx[17]
    n, d = struct.unpack_from("<QQ", idx, 18)
    pos = 34
    lengths = struct.unpack_from("<%di" % n, idx, pos)
    pointers = struct.unpack_from("<%dq" % n, idx, pos + 4 * n)
    doc_indices = struct.unpack_from("<%dq" % d, idx, pos + 12 * n)
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    fmt, size = FORMATS[code]
    seqs = [list(struct.unpack_from("<%d%s" % (l, fmt), data, p)) for l, p in zip(lengths, pointers)]
    docs = [seqs[doc_indices[i]:doc_indices[i + 1]] for i in range(d - 1)]
    print(json.dumps({"dtype": code, "docs": docs}, separators=(",", ":")))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
    elif sys.argv[1] == "read":
        read(sys.argv[2])
    else:
        sys.exit("usage: megatron_py.py write PREFIX CODE JSON | read PREFIX")
