"""
What train.py, finetune.py and the rest share: --help's format, the device and its precision, evaluation, the
frozen-prefix cache, and writing files so that a kill at any moment or a diverged run never leaves a broken or
wrong file behind.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile

import torch
import torch.nn.functional as F

from model import first_stage


class Help(argparse.RawDescriptionHelpFormatter):
    """--help in about 70 lines: short metavars, the default after each help where it is one value."""

    def __init__(self, prog):
        super().__init__(prog, width=110, max_help_position=30)

    def _get_default_metavar_for_optional(self, action):
        return "DIR" if action.dest.endswith("dir") else {int: "N", float: "X"}.get(action.type, "S")

    def _get_help_string(self, action):  # the default where it is one value (per-data ones say so themselves)
        h = action.help or ""
        plain = action.default in (None, False, "", argparse.SUPPRESS) or "default" in h
        return h if plain else h + " (default: %(default)s)"


CPU_BF16 = False  # bf16 autocast on the CPU too (--cpu_bf16): set once by get_device, read by autocast


def get_device(name="auto", cpu_bf16=False):
    """Resolve --device once; the CUDA-only speedups (TF32, bf16 autocast, channels_last) are switched on
    here. cpu_bf16: bf16 autocast on the CPU as well (1.5x faster with AMX / AVX512-BF16, slower without)."""
    global CPU_BF16
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu or auto")
    dev = torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    CPU_BF16 = cpu_bf16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print(f"device: cuda ({torch.cuda.get_device_name()}), bf16 autocast, TF32, channels_last")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads{', bf16 autocast' if cpu_bf16 else ''})"
              f"{'' if name == 'cpu' else ', no CUDA device found'}")
    return dev


def device_name(dev, cpuinfo="/proc/cpuinfo"):
    """The GPU's name, or "cpu (<model>, <vector unit>[, AMX])": bf16 results differ in the last images
    between CPUs with and without AMX, so each result says which ran it."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:  # Linux; elsewhere the platform module's word stays
            info = [line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line]
        info = {k.strip(): v.strip() for k, v in info}  # the first core's "key<tabs>: value" lines
        model, flags = info.get("model name", model), set(info.get("flags", "").split())
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
    return model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model


# evaluation batches of 256: 2.6x faster than 1000 on a 2-core CPU (cache-sized activations), no slower on a
# GPU
@torch.no_grad()
def hits(model, x, y, batch_size=256, start=0):
    """(bool per image: predicted right, mean loss) of model in eval mode on a split already on its device
    (start: the first stage to run, x its input)."""
    model.eval()
    out, loss = [], 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with autocast(x.device):
            logits = model(xb, start=start).float()
        out.append(logits.argmax(1) == yb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool), loss / max(len(x), 1)


def evaluate(model, x, y, batch_size=256, start=0):
    """Accuracy (%) and mean loss of model on a split already on its device."""
    hit, loss = hits(model, x, y, batch_size, start)
    return 100.0 * hit.sum().item() / max(len(x), 1), loss


@torch.no_grad()
def measure(model, split, start=0):
    """{"acc", "loss"} of a split (x, y) or (x, y, groups). With groups (waterbirds, celeba) acc is the worst
    group's accuracy (the paper's metric there), "avg_acc" the mean of the group accuracies, "group_acc" each
    (ids ascending)."""
    x, y, g = (*split, None)[:3]
    hit, loss = hits(model, x, y, start=start)
    if g is None:
        return {"acc": hit.float().mean().item() * 100, "loss": loss}
    acc = [hit[g == k].float().mean().item() * 100 for k in g.unique().tolist()]
    return {"acc": min(acc), "loss": loss, "avg_acc": sum(acc) / len(acc), "group_acc": acc}


# -----------------------------------------------------------------------------
# the prefix cache: stages before the first tuned one are frozen, so their output is computed once per split

@torch.no_grad()
def prefix(model, x, stop, chunk=256):
    """Output of the frozen stages [0, stop) for a whole split, once: eval mode, no grad, in chunks. Exact
    because those stages keep no batch-dependent state (GroupNorm; BatchNorm in eval mode) and nothing is
    augmented."""
    if stop == 0:
        return x
    model.eval()
    with autocast(x.device):
        return torch.cat([model(xb, start=0, stop=stop) for xb in x.split(chunk)])


def cached_splits(source, target, k, args, log=print):
    """({split: (stage-k activations or the images, y[, groups])}, {split: its start stage}): the frozen
    stages run once per split, train, val, test in turn while --prefix_cache_gb lasts (a ResNet-50 layer1
    output is 1.6 MB an image in bf16)."""
    budget, out, starts = args.prefix_cache_gb * 2 ** 30, {}, {}
    for s, (x, *rest) in target.items():
        one = prefix(source, x[:1], k)
        need = one.numel() * one.element_size() * len(x)
        starts[s] = k if k and need <= budget else 0
        budget -= need if starts[s] else 0
        out[s] = (prefix(source, x, starts[s]), *rest)
    if k and min(starts.values()) == 0:
        log(f"prefix cache: {', '.join(s for s in starts if not starts[s])} over --prefix_cache_gb "
            f"{args.prefix_cache_gb:g}: run whole every epoch")
    return out, starts


def cache_stage(names, args, arch):
    """Stages frozen and computed once: those before the first tuned one (0: none; BatchNorm in train mode
    makes their output depend on the batch; tune none evaluates once anyway)."""
    bn_train = args.bn == "train" and arch != "resnet26"  # the others have BatchNorm
    return 0 if not args.prefix_cache_gb or not names or bn_train else first_stage(names, arch)


def finite(loss, where, advice):
    """loss.item(), or one line and exit when it is NaN or infinite. Checked before backward(), so the weights
    never take a NaN step and a diverged run writes nothing (no result, no checkpoint)."""
    v = loss.item()
    if not math.isfinite(v):
        raise SystemExit(f"error: the loss is {v} at {where}: the run diverged; nothing was written. "
                         f"{advice}")
    return v


def fmt_time(s):
    return f"{s:.0f}s" if s < 100 else f"{s / 60:.1f}m"


def check_writable(path, flag):
    """One line and exit before any compute when the file path (or the folders it needs) cannot be written.
    Creates nothing: probes the nearest existing folder with a temporary file."""
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
        raise SystemExit(f"error: {flag} {path}: cannot write in {d} ({e.strerror}); choose another place")


def code_version(where=os.path.dirname(os.path.abspath(__file__))):
    """The git commit of the code in `where` ("<sha>-dirty" with uncommitted changes to tracked files), or
    None outside a git checkout: written into each result, so results from older code can be told apart."""
    def git(*a):
        return subprocess.run(["git", "-C", where, *a], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return None


def atomic_save(obj, path, write=torch.save):
    """write(obj, temp file), then rename: a reader (or a kill -9) sees the old file or the new one, never
    half of one. Temp files that killed writers left next to path are removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(obj, tmp)
    os.replace(tmp, path)
    remove_orphans(path)


def remove_orphans(path):
    """Delete path.tmp<PID> files whose writer process is gone (a kill -9 mid-write leaves one behind)."""
    for f in glob.glob(glob.escape(path) + ".tmp*"):
        pid = f.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(f)
            except OSError:
                pass  # another cleaner got there first


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def tidy(v):
    """A result for JSON: floats to 6 significant digits (31.999999284744263 -> 32.0), NaN / infinity as
    null."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: tidy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [tidy(x) for x in v]
    return v


def dumps(v, indent=""):
    """JSON with one line per leaf dict or list of numbers (one line per epoch), nested containers
    indented."""
    nested = isinstance(v, (dict, list)) and any(isinstance(x, (dict, list)) and x
                                                 for x in (v.values() if isinstance(v, dict) else v))
    if not nested:
        return json.dumps(v, allow_nan=False)
    inner = indent + " "
    if isinstance(v, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(x, inner)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + dumps(x, inner) for x in v) + "\n" + indent + "]"


def write_json(obj, path):
    """tidy(obj) as strict JSON at path, atomically; returns what was written."""
    obj = tidy(obj)

    def write(o, tmp):
        with open(tmp, "w") as f:
            f.write(dumps(o) + "\n")
    atomic_save(obj, path, write)
    return obj


# -----------------------------------------------------------------------------
# caches: decoded and generated tensors, written once with a checksum

def _digest(obj):
    """sha1 of every tensor's bytes in obj (a tensor, or dicts / tuples of them), in order, without copies."""
    h = hashlib.sha1()
    stack = [obj]
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
    """obj with its checksum, atomically (atomic_save): a cache that changes on disk is caught on
    load."""
    atomic_save({"sha1": _digest(obj), "data": obj}, path)


def load_cache(path):
    """A cache file's content, or None (then the caller rebuilds it) when it is missing, unreadable or its
    bytes no longer match the checksum written with it."""
    if not os.path.isfile(path):
        return None
    try:
        c = torch.load(path, weights_only=True)
        if c["sha1"] == _digest(c["data"]):
            return c["data"]
    except Exception:
        pass
    print(f"note: the cache {path} is unreadable or fails its checksum; rebuilding it")
    return None


def file_digest(paths):
    """sha1 of the files' contents: a cache keyed by it follows any change to them, whatever their times
    say."""
    h = hashlib.sha1()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
