"""GPU check: mine a generated dataset on the GPU(s) in each precision, print the speed of
each, rerun the default precision's embeddings on CPU and compare the negatives.

Run through bench/gpu_check.sh (on the device machine, or `--rehearse` on any machine).
Both encoders are built here with random weights (no hub, no package of weights): a
vision tower the size of CLIP ViT-B/32 and a text model the size of all-MiniLM-L6-v2 with a
WordPiece vocabulary of the demo's words, each saved with save_pretrained and passed to
hnm as a model folder. `--rehearse` builds the same encoders small, so that the whole
check runs on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (vision: hidden, layers, heads, image size, patch, projection), (text: hidden, layers,
# heads, intermediate): CLIP ViT-B/32 and MiniLM-L6-H384 on the device, tiny in a rehearsal
SIZES = {"device": ((768, 12, 12, 224, 32, 512), (384, 6, 12, 1536)),
         "rehearsal": ((32, 2, 4, 32, 8, 32), (32, 2, 4, 64))}


def vision_tower(folder: Path, sizes: tuple[int, ...]) -> None:
    """A randomly initialised CLIP vision tower (and its image processor)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    hidden, layers, heads, image, patch, projection = sizes
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              image_size=image, patch_size=patch, projection_dim=projection)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image},
                       crop_size={"height": image, "width": image}).save_pretrained(folder)


def text_model(folder: Path, sizes: tuple[int, ...], texts: list[str]) -> None:
    """A randomly initialised BERT sentence encoder with a WordPiece vocabulary of the
    words of `texts` (and single characters, so that any other word is still split)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    hidden, layers, heads, intermediate = sizes
    words = sorted({w for t in texts for w in _words(t)})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
             *(f"##{c}" for c in chars), *(w for w in words if len(w) > 1)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=256).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=intermediate),
              add_pooling_layer=False).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 256}\n')


def _words(text: str) -> list[str]:
    """BERT's basic split (lower case; punctuation apart)."""
    out, word = [], ""
    for c in text.lower():
        if c.isalnum():
            word += c
            continue
        out += [word] if word else []
        out += [c] if not c.isspace() else []
        word = ""
    return out + ([word] if word else [])


def replicate(annotations: Path, times: int) -> Path:
    """The demo's records `times` over (new ids and groups, the same image files): a run
    large enough that start-up no longer dominates its wall time."""
    records = json.loads(annotations.read_text())
    copies = [{**r, "id": f"{r['id']}_{k}", "first_instruction": f"{r['first_instruction']} {k}"}
              for k in range(times) for r in records]
    path = annotations.with_name(f"annotations_x{times}.json")
    path.write_text(json.dumps(copies))
    return path


def mine(args: list[str], **env: str) -> float:
    """Run launch.py; exit with its output if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    if run.returncode:
        sys.exit(f"run failed ({run.returncode}): {' '.join(args)}\n{run.stdout[-2000:]}\n"
                 f"{run.stderr[-3000:]}")
    return time.perf_counter() - t0


def export_embeddings(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Per-record image and text embeddings of a finished run, for the CPU rerun."""
    from hnm.data import load_corpus
    from hnm.lifecycle import load_run_config
    from hnm.storage import RunDir

    ds = load_corpus(load_run_config(RunDir(run_dir)))
    np.save(out / "image.npy", np.load(run_dir / "tables/visual.npy"))
    np.save(out / "text.npy", np.load(run_dir / "tables/text.npy")[ds.text_ids])
    return out / "image.npy", out / "text.npy"


def planned_precision(run_dir: Path) -> str:
    return json.loads((run_dir / "plan.json").read_text())["placement"]["precision"]


def indexes(run_dir: Path) -> str:
    """The search indexes the run's workers used (their candidates markers say)."""
    kinds = {json.loads(p.read_text())["index"] for p in run_dir.glob("candidates/done_*")}
    return ",".join(sorted(kinds))


def row(name: str, seconds: float, run_dir: Path) -> str:
    """Wall time, samples/s end to end, embed phase img/s, data wait, start-up, search."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n = metrics["global"]["anchors"]
    embed = [json.loads(p.read_text()) for p in run_dir.glob("embeddings/done_*")]
    phase = max(e["embed_images"] for e in embed)
    images = f"{n / phase:7.0f} img/s" if phase > 0.01 else "      - img/s"
    devices = ",".join(sorted({s["device"] for s in metrics["shards"]}))
    t = metrics["timing"]
    return (f"{name:<28} {devices:<8} {planned_precision(run_dir):<5} {indexes(run_dir):<14}"
            f" wall {seconds:6.1f}s {n / seconds:7.0f} samples/s  embed {images}"
            f"  data wait {t.get('data_wait', 0):5.1f}s  start-up {t.get('startup', 0):5.1f}s"
            f"  search {t['search']:5.1f}s")


def environment() -> str:
    """The interpreter and the packages the check runs on (CUDA is not initialised here:
    the runs' workers use the GPU, not this process)."""
    import numpy
    import torch
    import transformers

    return (f"python {sys.version.split()[0]}, torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}), transformers {transformers.__version__}, numpy "
            f"{numpy.__version__}")


def index_line(rehearse: bool) -> str:
    """Which exact index the GPU runs use, and why."""
    from hnm.index import faiss_available, faiss_gpu

    where = "the CPU standing in for the GPU" if rehearse else "the GPU"
    if faiss_gpu():
        return f"Index: FAISS GPU (faiss-gpu installed): the runs measure FaissFlatIP on {where}"
    if faiss_available():
        return ("Index: FAISS without its GPU build: the runs measure hnm's torch index "
                f"(TorchFlatIP) on {where}")
    return ("Index: FAISS is not installed (not on the device image, and faiss-gpu-cu12's CUDA "
            f"libraries are too large to carry): the runs measure hnm's torch index "
            f"(TorchFlatIP) on {where}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true",
                        help="the same check on this machine, with small encoders and data")
    parser.add_argument("--dialogs", type=int, help="demo dialogs of 5 images (400; 20)")
    parser.add_argument("--replicate", type=int,
                        help="records repeated this often in the timed runs (10; 2)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16",
                        help="run in each of these too (after auto); empty: auto only")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from hnm.demo import make_demo

    hf_logging.set_verbosity_error()  # the encoders are built here: no progress bars
    hf_logging.disable_progress_bar()

    kind = "rehearsal" if args.rehearse else "device"
    dialogs = args.dialogs or (20 if args.rehearse else 400)
    times = args.replicate or (2 if args.rehearse else 10)
    (vision, text), image_size = SIZES[kind], SIZES[kind][0][3]
    print(environment(), flush=True)
    print(index_line(args.rehearse), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hnm_gpu_"))
    t0 = time.perf_counter()
    demo = make_demo(tmp / "data", num_dialogs=dialogs, image_size=image_size)
    annotations = replicate(demo, times)
    vision_tower(tmp / "vision", vision)
    text_model(tmp / "text", text, [r["answer"] for r in json.loads(demo.read_text())])
    print(f"data and models ready in {time.perf_counter() - t0:.0f}s: {dialogs * 5 * times} "
          f"samples, {image_size}px PNG; encoders: random CLIP vision {vision[:2]} "
          f"(hidden, layers), random BERT text {text[:2]} ({kind} sizes)", flush=True)
    common = ["--config", "configs/demo.yaml", "--annotations", str(annotations),
              "--image-dir", str(tmp / "data"), "--batch-size", str(args.batch_size),
              "--k-nn", "100", "--quiet",
              # the CPU rerun's precomputed texts match a blacklist by its words, the GPU
              # runs by the text model: without one, both decide eligibility alike
              "--blacklist", ""]
    encoders = ["--visual-encoder", str(tmp / "vision"), "--text-encoder", str(tmp / "text")]
    rows, done = [], set()
    where = "CPU as GPU" if args.rehearse else "GPU"
    for precision in ["auto", *(p for p in args.precisions.split(",") if p)]:
        if precision in done:
            continue
        out = tmp / f"gpu_{precision}"
        seconds = mine([*common, *encoders, "--precision", precision, "--output-dir", str(out)])
        rows.append(row(f"{where}, --precision {precision}", seconds, out))
        done.add(planned_precision(out))
        print(rows[-1], flush=True)
    image, text_file = export_embeddings(tmp / "gpu_auto", tmp)
    cpu_s = mine([*common, "--image-embeddings", str(image), "--text-embeddings",
                  str(text_file), "--output-dir", str(tmp / "cpu")], CUDA_VISIBLE_DEVICES="")
    same = (tmp / "gpu_auto/negatives.jsonl").read_bytes() == \
        (tmp / "cpu/negatives.jsonl").read_bytes()
    print(f"\n{'run':<28} {'devices':<8} {'prec':<5} {'index':<14} (embed img/s: over the "
          "slowest worker's embed phase; data wait, start-up, search: summed over workers)")
    print("\n".join(rows))
    print(row("CPU rerun, same embeddings", cpu_s, tmp / "cpu"))
    print(f"negatives identical ({where} auto vs CPU rerun, byte for byte): "
          f"{'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
