"""
What train.py, finetune.py and the rest share: the device and its precision, evaluation, and writing files so that
a kill at any moment or a diverged run never leaves a broken or wrong file behind.
"""
import glob
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F

CPU_BF16 = False  # bf16 autocast on the CPU too (--cpu_bf16): set once by get_device, read by autocast


def get_device(name="auto", cpu_bf16=False):
    """Resolve --device once; the CUDA-only speedups (TF32, bf16 autocast, channels_last) are switched on here.
    cpu_bf16: bf16 autocast on the CPU as well (1.5x faster with AMX / AVX512-BF16, slower without)."""
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


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def autocast(dev):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=CPU_BF16)


def prepare(model, dev):
    model = model.to(dev)
    return model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model


# evaluation batches of 256: 2.6x faster than 1000 on a 2-core CPU (cache-sized activations), no slower on a GPU
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


def finite(loss, where, advice):
    """loss.item(), or one line and exit when it is NaN or infinite. Checked before backward(), so the weights
    never take a NaN step and a diverged run writes nothing (no result, no checkpoint)."""
    v = loss.item()
    if not math.isfinite(v):
        raise SystemExit(f"error: the loss is {v} at {where}: the run diverged; nothing was written. {advice}")
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


def atomic_save(obj, path, write=torch.save):
    """write(obj, temp file), then rename: a reader (or a kill -9) sees the old file or the new one, never half of
    one. Temp files that killed writers left next to path are removed."""
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
    """A result for JSON: floats to 6 significant digits (31.999999284744263 -> 32.0), NaN / infinity as null."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: tidy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [tidy(x) for x in v]
    return v


def dumps(v, indent=""):
    """JSON with one line per leaf dict or list of numbers (one line per epoch), nested containers indented."""
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
