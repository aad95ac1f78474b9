"""Scale benchmark: whole runs through launch.py from precomputed embeddings, at 100k-1M
samples with realistic phrase reuse, and a templated-captions case (a few hundred captions
shared by tens of thousands of images); wall time, time per phase, peak memory, recall."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 65536  # rows generated per step: keeps the generator's own memory small

# ---------------------------------------------------------------- realistic data

SYLLABLES = "ba ro ne ti ku la mo si de vu ga pe lo ri na to".split()
AFFIRMATIONS = ("yes", "okay", "turn left", "keep going", "go straight")


def _words(rng: np.random.Generator, count: int) -> list[str]:
    """Pseudo-words of 2-3 syllables (about 6 characters, like real answer words)."""
    return sorted({"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
                   for _ in range(count)})


def _phrases(rng: np.random.Generator, words: list[str], count: int) -> list[str]:
    """Distinct answers of every length class: < 20 characters (too short), < 60, < 100, more."""
    out: dict[str, None] = {}
    lengths = (1, 2, 4, 6, 9, 12, 16, 22)
    while len(out) < count:
        need = count - len(out)
        sizes = rng.choice(lengths, size=need)
        picks = rng.integers(0, len(words), size=int(sizes.sum()))
        for phrase in np.split(picks, np.cumsum(sizes)[:-1]):
            out[" ".join(words[w] for w in phrase)] = None
    return list(out)[:count]


def _bag_of_words(phrases: list[str], rng: np.random.Generator, dim: int) -> np.ndarray:
    """Text embeddings: idf-weighted mean word vector plus a weak shared direction (phrases
    sharing rare words are alike, frequent words matter less, as with sentence encoders)."""
    index: dict[str, int] = {}
    tokens = [np.array([index.setdefault(w, len(index)) for w in p.split()], np.int64)
              for p in phrases]
    words = list(index)
    df = np.bincount(np.concatenate([np.unique(t) for t in tokens]), minlength=len(words))
    idf = np.log(len(phrases) / np.maximum(df, 1)) + 0.1
    vectors = rng.normal(size=(len(words), dim)) * idf[:, None]
    common = rng.normal(size=dim) * float(np.median(np.linalg.norm(vectors, axis=1))) * 0.3
    out = np.zeros((len(phrases), dim), np.float32)
    for s in range(0, len(phrases), BLOCK):
        part = tokens[s:s + BLOCK]
        flat = np.concatenate(part)
        owner = np.repeat(np.arange(len(part)), [len(t) for t in part])
        block = np.zeros((len(part), dim))
        np.add.at(block, owner, vectors[flat])
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + BLOCK] = block + common / np.linalg.norm(common) * 0.3
    return out


def realistic(root: Path, n: int, dim: int, text_dim: int, seed: int) -> dict[str, str]:
    """Dialogs of 5 samples over places and scene types; answers reused Zipf-like (about
    half of the samples' answers are distinct), ~3% short affirmations."""
    rng = np.random.default_rng(seed)
    words = _words(rng, 600)
    vocab = _phrases(rng, words, n) + list(AFFIRMATIONS)
    weights = 1.0 / (np.arange(n) + 0.05 * n)
    text_ids = rng.choice(n, size=n, p=weights / weights.sum())
    banned = rng.random(n) < 0.03
    text_ids[banned] = n + rng.integers(0, len(AFFIRMATIONS), int(banned.sum()))
    used, text_ids = np.unique(text_ids, return_inverse=True)
    phrases = [vocab[i] for i in used]
    T = _bag_of_words(phrases, rng, text_dim)
    groups = np.arange(n) // 5
    places = max(1, n // 100)  # ~20 dialogs per place, 30 scene types
    scene_of_place = rng.integers(0, 30, places)
    place_of_group = rng.integers(0, places, groups[-1] + 1)
    scene = rng.normal(size=(30, dim)).astype(np.float32)
    place = rng.normal(size=(places, dim)).astype(np.float32)
    image = _open(root / "image_embeddings.npy", (n, dim))
    text = _open(root / "text_embeddings.npy", (n, text_dim))
    for s in range(0, n, BLOCK):  # BLOCK is a multiple of 5: a dialog never straddles blocks
        g = groups[s:s + BLOCK]
        where = place_of_group[g]
        dialog = rng.normal(size=(g[-1] - g[0] + 1, dim)).astype(np.float32)[g - g[0]]
        image[s:s + BLOCK] = (scene[scene_of_place[where]] + 0.7 * place[where]
                              + 0.5 * dialog + 0.9 * rng.normal(size=(len(g), dim)))
        text[s:s + BLOCK] = T[text_ids[s:s + BLOCK]]
    image.flush()
    text.flush()
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as out:
        for s in range(0, n, BLOCK):
            out.write("".join(json.dumps({"id": i, "image": f"img/{i}.jpg",
                                          "text": phrases[text_ids[i]], "group": int(groups[i])})
                              + "\n" for i in range(s, min(n, s + BLOCK))))
    return _paths(root)


# ---------------------------------------------------------------- templated captions

SCENES = {  # scene type -> (what is there, where it is)
    "farmland": ("a piece of farmland", "green fields"), "parking": ("cars", "the parking lot"),
    "residential": ("houses", "the residential area"), "river": ("a river", "the trees"),
    "forest": ("many trees", "the forest"), "beach": ("the sea", "a beach"),
    "airport": ("planes", "the airport"), "port": ("boats", "the port"),
    "bridge": ("a bridge", "the river"), "church": ("a church", "the square"),
    "desert": ("sand", "the desert"), "industrial": ("factories", "the industrial area"),
    "meadow": ("grass", "the meadow"), "mountain": ("mountains", "the valley"),
    "park": ("a park", "the city"), "playground": ("a playground", "the school"),
    "pond": ("a pond", "the grass"), "railway": ("railway tracks", "the station"),
    "stadium": ("a stadium", "the buildings"), "storage": ("storage tanks", "the plant"),
    "square": ("a square", "the buildings"), "school": ("a school", "the houses"),
    "resort": ("a resort", "the pool"), "viaduct": ("a viaduct", "the roads"),
    "center": ("tall buildings", "the center"), "commercial": ("shops", "the street"),
    "dense": ("dense buildings", "the block"), "sparse": ("sparse houses", "the land"),
    "baseball": ("a baseball field", "the trees"), "bareland": ("bare land", "the roads"),
}
TEMPLATES = ("There is {what} .", "There is {what} near {where} .",
             "Lots of {what} in {where} .", "Many {what} are around {where} .",
             "Some {what} are next to {where} .", "{what} surrounded by {where} .",
             "It is {what} in {where} .", "We can see {what} and {where} .",
             "A large area of {what} .", "{what} with {where} nearby .",
             "Several {what} beside {where} .")


def templated(root: Path, n: int, dim: int, text_dim: int, seed: int, base: int = 1600,
              noise: float = 0.05) -> dict[str, str]:
    """`base` images of 30 scene types, each captioned with one of its type's ~11 captions
    (~320 distinct in all), replicated with small visual noise up to n samples; every sample
    is its own group (as the first caption of each image of an aerial captioning set)."""
    rng = np.random.default_rng(seed)
    captions = [[t.format(what=w, where=p) for t in TEMPLATES] for w, p in SCENES.values()]
    flat = [c for per in captions for c in per]
    T = _bag_of_words([c.lower() for c in flat], rng, text_dim)
    kinds = rng.integers(0, len(SCENES), base)
    caption = kinds * len(TEMPLATES) + rng.integers(0, len(TEMPLATES), base)
    scene = rng.normal(size=(len(SCENES), dim))
    images = scene[kinds] + 0.8 * rng.normal(size=(base, dim))
    image = _open(root / "image_embeddings.npy", (n, dim))
    text = _open(root / "text_embeddings.npy", (n, text_dim))
    rows = np.arange(n) % base
    for s in range(0, n, BLOCK):
        r = rows[s:s + BLOCK]
        image[s:s + BLOCK] = images[r] + noise * rng.normal(size=(len(r), dim))
        text[s:s + BLOCK] = T[caption[r]]
    image.flush()
    text.flush()
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as out:
        out.write("".join(json.dumps({"id": i, "image": f"img/{rows[i]}.jpg",
                                      "text": flat[caption[rows[i]]]}) + "\n"
                          for i in range(n)))
    return _paths(root)


def _open(path: Path, shape: tuple[int, int]) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _paths(root: Path) -> dict[str, str]:
    return {"annotations": str(root / "annotations.jsonl"),
            "image_embeddings": str(root / "image_embeddings.npy"),
            "text_embeddings": str(root / "text_embeddings.npy")}


# ---------------------------------------------------------------- running and measuring


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), depth first."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            out += [kid, *_children(kid)]
    return out


def _status_mib(pid: int, *keys: str) -> float | None:
    """The sum of `keys` of /proc/PID/status (kB figures), MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) for line in lines if line.split(":")[0] in keys]
    return sum(found) / 1024 if found else None


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM), MiB. It counts the pages of
    memory-mapped files (the tables, the IVF index), which every process maps and the
    kernel can drop, once per process."""
    return _status_mib(pid, "VmHWM")


def _private_mb(pid: int) -> float | None:
    """The process's own memory now: anonymous pages and shared memory (not file pages)."""
    return _status_mib(pid, "RssAnon", "RssShmem")


def _used_mb() -> float:
    """The machine's memory in use (MemTotal - MemAvailable): page cache not counted."""
    info = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process so far: what its work costs on an idle core,
    whatever else the machine is running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Watch:
    """Samples the peak memory and CPU time of a process and of every process it starts."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.peaks: dict[int, float] = {}
        self.private: dict[int, float] = {}  # peak of _private_mb per process
        self.cpu: dict[int, float] = {}
        self.baseline = _used_mb()
        self.machine = 0.0  # peak of the machine's memory in use, above the baseline
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for pid in [self.pid, *_children(self.pid)]:
                peak, cpu, own = _peak_rss_mb(pid), _cpu_seconds(pid), _private_mb(pid)
                if peak is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))
                if own is not None:
                    self.private[pid] = max(own, self.private.get(pid, 0.0))
                if cpu is not None:
                    self.cpu[pid] = cpu
            self.machine = max(self.machine, _used_mb() - self.baseline)
            self.stop.wait(self.every_s)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def launch_run(repo: Path, paths: dict[str, str], out: Path, extra: list[str]) -> dict:
    """One `python launch.py ...` run of `repo`'s hnm: wall time, metrics, peak memory."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "launch.py", "--annotations", paths["annotations"],
           "--image-embeddings", paths["image_embeddings"], "--text-embeddings",
           paths["text_embeddings"], "--output-dir", str(out), "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watch = Watch(proc.pid)
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    watch.finish()
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{output}")
    metrics = json.loads((out / "metrics.json").read_text())
    peaks, own, cpu = watch.peaks, watch.private, watch.cpu
    return {"wall": wall, "metrics": metrics, "cmd": cmd, "machine_mb": watch.machine,
            "parent": (peaks.pop(proc.pid, 0.0), own.pop(proc.pid, 0.0),
                       cpu.pop(proc.pid, 0.0)),
            "children": sorted(((peaks[p], own.get(p, 0.0), cpu.get(p, 0.0)) for p in peaks),
                               reverse=True)}


def _process(peak: float, private: float, cpu: float) -> str:
    return f"{peak:.0f} MiB ({private:.0f}) / {cpu:.0f} s"


def report(name: str, r: dict) -> None:
    m, g = r["metrics"], r["metrics"]["global"]
    index = m.get("index", {})
    recall = (index.get("recall") or {}).get("recall_at_k")
    workers = [_process(*child) for child in r["children"]
               if child[0] > 100]  # not the resource tracker
    print(f"\n## {name}\n$ {' '.join(r['cmd'][1:])}")
    print(f"wall {r['wall']:.1f} s; index {index.get('kind', 'exact')} "
          f"({index.get('reason', '')}); recall@k_nn "
          f"{'n/a (exact)' if recall is None else f'{recall:.4f}'}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in m["timing"].items()))
    print(f"peak RSS (private) / CPU time: launch process {_process(*r['parent'])}; worker "
          f"processes: {', '.join(workers) or 'none'}; machine memory in use, peak above "
          f"before the run: {r['machine_mb']:.0f} MiB")
    print(f"anchors {g['anchors']}, success rate {g['success_rate']}, hard {g['hard_negatives']}, "
          f"diverse {g['diverse_negatives']}, diverse searches past the list "
          f"{g.get('diverse_widened_searches')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cases", default="templated,realistic",
                   help="comma-separated: templated, realistic")
    p.add_argument("--sizes", default="100000,300000,1000000",
                   help="realistic case sizes (rows)")
    p.add_argument("--templated-size", type=int, default=51_200)
    p.add_argument("--index", default="auto", help="--index of the realistic runs")
    p.add_argument("--workers", type=int, default=1, help="--cpu-workers of every run")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--data", type=Path, default=Path("/tmp/hnm_scale"),
                   help="where the generated inputs are kept (reused when present)")
    p.add_argument("--compare-repo", type=Path, default=None,
                   help="also run each case with this checkout's hnm (e.g. the previous release)")
    p.add_argument("--extra", default="", help="more flags for every run")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    extra = ["--cpu-workers", str(args.workers), *args.extra.split()]
    todo = []
    if "templated" in args.cases:
        todo.append((f"templated captions, {args.templated_size:,} samples", "templated",
                     args.templated_size, extra))
    if "realistic" in args.cases:
        todo += [(f"realistic, {n:,} samples, --index {args.index}", "realistic", n,
                  [*extra, "--index", args.index])
                 for n in (int(x) for x in args.sizes.split(",") if x)]
    for name, kind, n, flags in todo:
        root = args.data / f"{kind}_{n}"
        if not (root / "annotations.jsonl").exists():
            make = templated if kind == "templated" else realistic
            t0 = time.perf_counter()
            make(root, n, args.dim, args.text_dim, seed=0)
            print(f"(generated {root} in {time.perf_counter() - t0:.0f} s)")
        paths = _paths(root)
        for repo in [ROOT] + ([args.compare_repo] if args.compare_repo else []):
            label = name if repo == ROOT else f"{name} [{repo}]"
            flags_here = flags if repo == ROOT else _known_flags(flags)
            report(label, launch_run(repo, paths, root / f"run_{repo.name}", flags_here))
    return 0


def _known_flags(flags: list[str]) -> list[str]:
    """A previous release has no --index: leave it (and its value) out."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f == "--index":
            skip = True
        else:
            out.append(f)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
