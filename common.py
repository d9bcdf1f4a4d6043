"""
What every script shares: the device and its precision, and files written so
that a kill at any moment, a full disk or a diverged run never leaves a
broken or wrong file behind. Imports nothing of the project.
"""
import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile

import torch

class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, defaults shown, short metavars."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26, width=100)

    def _get_default_metavar_for_optional(self, action):
        return "X"


CPU_BF16 = False  # bf16 autocast on the CPU too (--cpu_bf16), set by get_device


def run(main, said="nothing of the run in flight was written"):
    """A script's entry point: Ctrl-C is one line and exit 130, as shells do."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"interrupted: {said}", file=sys.stderr)
        sys.exit(130)


def get_device(name="auto", cpu_bf16=False):
    """Resolve --device once; the CUDA-only speedups are switched on here.
    cpu_bf16: 1.5x faster on CPUs with AMX, slower on others."""
    global CPU_BF16
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; "
                         "use --device cpu or auto")
    cuda = name in ("auto", "cuda") and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    CPU_BF16 = cpu_bf16
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print(f"device: cuda ({torch.cuda.get_device_name()}), bf16 autocast, "
              "TF32, channels_last")
    else:
        bf16 = ", bf16 autocast" if cpu_bf16 else ""
        why = "" if name == "cpu" else ", no CUDA device found"
        print(f"device: cpu ({torch.get_num_threads()} threads{bf16}){why}")
    return dev


def device_name(dev, cpuinfo="/proc/cpuinfo"):
    """The GPU's name, or "cpu (<model>, <vector unit>[, AMX])": bf16 runs
    differ in the last images between CPUs with and without AMX."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model, flags = platform.processor() or platform.machine(), set()
    try:  # Linux: the first core's "key<tabs>: value" lines
        with open(cpuinfo) as f:
            first = f.read().split("\n\n")[0].splitlines()
        info = dict(line.split(":", 1) for line in first if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = info.get("model name", model)
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    unit = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({model}, {unit}{', AMX' if 'amx_bf16' in flags else ''})"


def autocast(dev):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=CPU_BF16)


def prepare(model, dev):
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def finite(loss, where, advice):
    """loss.item(), or one line and exit when it is NaN or infinite. Checked
    before backward(): the weights never take a NaN step."""
    v = loss.item()
    if not math.isfinite(v):
        raise SystemExit(f"error: the loss is {v} at {where}: the run diverged; "
                         f"nothing was written. {advice}")
    return v


def fmt_time(s):
    return f"{s:.0f}s" if s < 100 else f"{s / 60:.1f}m"


def check_writable(path, flag):
    """One line and exit, before any compute, when path cannot be written.
    Creates nothing: probes the nearest existing folder."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder; give a file path")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        if os.path.exists(d):
            raise SystemExit(f"error: {flag} {path}: {d} is a file, not a folder")
        d = os.path.dirname(d)
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write in {d} "
                         f"({e.strerror}); choose another place")


def code_version(where=os.path.dirname(os.path.abspath(__file__))):
    """The git commit here ("-dirty" with uncommitted changes), or None."""
    def git(*a):
        return subprocess.run(["git", "-C", where, *a], capture_output=True,
                              text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout
        return head.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None


# -----------------------------------------------------------------------------
# atomic files: a reader (or a kill -9) sees the old file or the new one

def atomic_save(obj, path, write=None):
    """write(obj, a temp file), then rename it to path. Temp files of killed
    writers next to path are removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, write = f"{path}.tmp{os.getpid()}", write or torch.save
    try:
        write(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no temp file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    for f in glob.glob(glob.escape(path) + ".tmp*"):
        pid = f.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            try:
                os.remove(f)
            except OSError:
                pass  # another cleaner got there first


@contextlib.contextmanager
def claim(path):
    """Yields True if this process may make path, False when it exists or
    another process holds its lock (<folder>/.locks/<name>; a kill frees it)."""
    folder = os.path.join(os.path.dirname(path), ".locks")
    name = os.path.join(folder, os.path.basename(path))
    for _ in range(100):  # another claimer may remove the empty folder between our two steps
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.makedirs(folder, exist_ok=True)
            lock = open(name, "a")
            break
    else:
        lock = open(name, "a")  # the folder is not coming back: say why
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:  # checked again under the lock: it may have finished meanwhile
            yield not os.path.exists(path)
        finally:  # ours removed before unlock: a later claimer makes a new one
            with contextlib.suppress(OSError):
                if os.stat(name).st_ino == os.fstat(lock.fileno()).st_ino:
                    os.remove(name)
                os.rmdir(folder)  # only if empty


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    return True


def tidy(v):
    """For JSON: floats to 6 significant digits, NaN / inf as null."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: tidy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [tidy(x) for x in v]
    return v


def dumps(v, indent=""):
    """JSON with one line per leaf dict or list (one line per epoch)."""
    inner = v.values() if isinstance(v, dict) else v
    if not (isinstance(v, (dict, list))
            and any(isinstance(x, (dict, list)) and x for x in inner)):
        return json.dumps(v, allow_nan=False)
    ind = indent + " "
    if isinstance(v, dict):
        items = [f"{ind}{json.dumps(k)}: {dumps(x, ind)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(ind + dumps(x, ind) for x in v) + "\n" + indent + "]"


def write_json(obj, path):
    """tidy(obj) as JSON at path, atomically; returns what was written."""
    obj = tidy(obj)

    def write(o, tmp):
        with open(tmp, "w") as f:
            f.write(dumps(o) + "\n")
    atomic_save(obj, path, write)
    return obj


# -----------------------------------------------------------------------------
# caches: decoded and generated tensors, written once with a checksum

def digest(obj):
    """sha1 of every tensor's bytes in obj (nested dicts / tuples), in order."""
    h, stack = hashlib.sha1(), [obj]
    while stack:
        o = stack.pop(0)
        if isinstance(o, torch.Tensor):
            h.update(o.contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            stack = list(o.values()) + stack
        elif isinstance(o, (list, tuple)):
            stack = list(o) + stack
    return h.hexdigest()


def save_cache(obj, path):
    atomic_save({"sha1": digest(obj), "data": obj}, path)


def load_cache(path):
    """A cache file's content, or None (rebuild it) when it is missing,
    unreadable or fails its checksum."""
    if not os.path.isfile(path):
        return None
    try:
        c = torch.load(path, weights_only=True)
        if c["sha1"] == digest(c["data"]):
            return c["data"]
    except Exception:
        pass
    print(f"note: the cache {path} is unreadable or fails its checksum; "
          "rebuilding it")
    return None


def file_digest(paths):
    """sha1 of the files' contents: a cache key that follows any change."""
    h = hashlib.sha1()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
