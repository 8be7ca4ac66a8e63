"""Fetch and extract the demo-model training corpus: Jane Austen's six novels.

Source: the Debian package ``r-cran-janeaustenr`` (CRAN package janeaustenr by
Julia Silge, MIT licence; the novels themselves are public domain, taken from
Project Gutenberg).  The novels are stored inside the package as an R lazy-load
database (``data/Rdata.rdb`` + ``Rdata.rdx``); this module contains a minimal
reader for R's XDR serialization format, enough to pull out the character
vectors, so neither R nor any extra Python package is required.

Usage::

    python tools/demo/corpus.py            # writes tools/demo/data/austen.txt

which runs ``apt-get download r-cran-janeaustenr`` and ``dpkg -x`` in a temp
dir (or reuses ``--deb PATH`` if you already have the .deb).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import struct
import subprocess
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data", "austen.txt")
PKG = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
# Order in which the novels are concatenated (publication order).
BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
         "northangerabbey", "persuasion"]


class _RReader:
    """Minimal reader for R's XDR ("X\\n") serialization, versions 2 and 3."""

    def __init__(self, buf: bytes):
        self.b = buf
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def _bytes(self, n: int) -> bytes:
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def read(self):
        assert self._bytes(2) == b"X\n", "only XDR serialization supported"
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader version
        if version == 3:
            n = self._int()
            self._bytes(n)  # native encoding
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE_SXP
            return None
        if t in (242, 251, 252, 253):  # empty env, missing arg, base env, global env...
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self._item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            return self._bytes(n).decode("utf-8", errors="replace")
        if t in (2, 6, 17):  # LISTSXP / LANGSXP / DOTSXP (pairlists)
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            out = [(tag, car)]
            if isinstance(cdr, _PairList):
                out += cdr.items
            pl = _PairList(out)
            pl.attr = attr
            return pl
        if t in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP
            n = self._int()
            val = [self._item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP / INTSXP
            n = self._int()
            val = list(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._int()
            val = list(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError("unsupported R SEXP type %d" % t)
        attr = self._item() if has_attr else None
        return _RVec(val, attr)


class _PairList:
    def __init__(self, items):
        self.items = items
        self.attr = None

    def get(self, key):
        for k, v in self.items:
            if k == key:
                return v
        return None


class _RVec(list):
    def __init__(self, val, attr):
        super().__init__(val)
        self.attr = attr

    def names(self):
        return self.attr.get("names") if isinstance(self.attr, _PairList) else None


def read_austen_books(data_dir: str) -> dict[str, list[str]]:
    """Return {book_name: list_of_lines} from the janeaustenr lazy-load DB."""
    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = _RReader(gzip.decompress(f.read())).read()
    names = list(index.names())
    variables = index[names.index("variables")]
    var_names = list(variables.names())
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        rdb = f.read()
    books = {}
    for name, (off, length) in zip(var_names, variables):
        off, length = int(off), int(length)
        blob = rdb[off:off + length]
        raw_len = struct.unpack(">I", blob[:4])[0]
        payload = zlib.decompress(blob[4:])
        assert len(payload) == raw_len
        books[name] = list(_RReader(payload).read())
    return books


def lines_to_text(lines: list[str]) -> str:
    """Join Gutenberg hard-wrapped lines into one paragraph per line."""
    paras, cur = [], []
    for ln in lines:
        ln = (ln or "").strip()
        if ln:
            cur.append(" ".join(ln.replace("_", "").split()))
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras) + "\n"


def extract_package(deb: str | None, workdir: str) -> str:
    if deb is None:
        subprocess.run(["apt-get", "download", PKG], cwd=workdir, check=True)
        deb = sorted(glob.glob(os.path.join(workdir, PKG + "_*.deb")))[-1]
    root = os.path.join(workdir, "root")
    subprocess.run(["dpkg", "-x", deb, root], check=True)
    return os.path.join(root, RDATA_DIR)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deb", help="path to an already downloaded %s .deb" % PKG)
    ap.add_argument("--data-dir", help="already-extracted janeaustenr data/ directory")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or extract_package(args.deb, tmp)
        books = read_austen_books(data_dir)
    missing = [b for b in BOOKS if b not in books]
    assert not missing, "missing books %s (have %s)" % (missing, list(books))
    text = "".join(lines_to_text(books[b]) for b in BOOKS)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print("wrote %s: %d chars, %d paragraphs, books: %s"
          % (args.out, len(text), text.count("\n"), ", ".join(BOOKS)))


if __name__ == "__main__":
    main()
