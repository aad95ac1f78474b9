"""Embedding speed: the encoders per precision, layout and thread count; decoding per image
format; whole runs (default settings against one fp32 worker); picks and quality per
precision on the demo."""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = {"jpeg": ("jpg", {"quality": 90}), "png": ("png", {}), "tiff": ("tif", {})}


# ---------------------------------------------------------------- data


def make_images(folder: Path, count: int, size: int) -> dict[str, list[Path]]:
    """Demo aerial views (hnm.demo) written as JPEG, PNG and TIFF, plus 4x larger JPEGs."""
    from PIL import Image

    from hnm.demo import make_demo

    make_demo(folder / "demo", num_dialogs=max(1, -(-count // 5)), image_size=size)
    sources = sorted((folder / "demo/images").glob("*.png"))[:count]
    out: dict[str, list[Path]] = {name: [] for name in [*FORMATS, "jpeg-4x"]}
    for i, source in enumerate(sources):
        with Image.open(source) as img:
            rgb = img.convert("RGB")
            for name, (ext, options) in FORMATS.items():
                out[name].append(folder / f"{i:05d}.{ext}")
                rgb.save(out[name][-1], **options)
            out["jpeg-4x"].append(folder / f"{i:05d}_4x.jpg")
            rgb.resize((4 * size, 4 * size), Image.BICUBIC).save(out["jpeg-4x"][-1], quality=90)
    return out


def make_phrases(count: int) -> list[str]:
    """Instruction-like phrases of many lengths (the demo's wording)."""
    from hnm import demo

    rng = np.random.default_rng(0)
    templates = demo.FIRST + demo.KEEP + demo.NEAR + demo.LAND + demo.SHORT_ANSWERS
    words = dict(dir="north", road=" along the road", target="the red roof", rel="by the lake")
    out = []
    for i in range(count):
        text = templates[rng.integers(len(templates))].format(**words)
        out.append(f"{text} {' '.join(['then keep going'] * int(rng.integers(0, 4)))} ({i})")
    return out


# ---------------------------------------------------------------- timing helpers


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall seconds of `repeats` calls (after one warm-up call), and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.sum(a * b, axis=1).min())


# ---------------------------------------------------------------- encoders


def efficientnet_variants() -> dict[str, Any]:
    """EfficientNet-Lite0 as it ran before (NCHW, batch norms, 64 images a pass) and with
    this release's changes one by one: channels-last, folded batch norms (fp32 only),
    a few images a pass."""
    import torch

    from hnm.embed import CPU_ROWS_PER_PASS as rows
    from hnm.encoders import EfficientNetLite0

    folded = EfficientNetLite0(torch.device("cpu"))
    kept = EfficientNetLite0(torch.device("cpu"), "bf16")  # the norms stay in bf16/fp16
    before, nchw_folded = copy.deepcopy(kept), copy.deepcopy(folded)
    for encoder in (before, nchw_folded):
        encoder.model = encoder.model.to(memory_format=torch.contiguous_format)
    return {"nchw, bn, 64/pass (before)": (before, 64, False),
            f"nchw, folded, {rows}/pass": (nchw_folded, rows, False),
            "channels_last, folded, 64/pass": (folded, 64, True),
            f"channels_last, bn, {rows}/pass (now in bf16, fp16)": (kept, rows, True),
            f"channels_last, folded, {rows}/pass (now in fp32)": (folded, rows, True)}


def run_variant(encoder: Any, layout_cl: bool, pixels: Any, rows: int, precision: str
                ) -> np.ndarray:
    """Features of `pixels` as the pipeline computes them, `rows` images a pass."""
    import torch

    from hnm.precision import autocast

    out = []
    with torch.inference_mode(), autocast("cpu", precision):
        for part in pixels.split(rows):
            x = part.contiguous(memory_format=torch.channels_last if layout_cl
                                else torch.contiguous_format)
            out.append(encoder.model.extract_features(x).float().mean(dim=(2, 3)).double())
    return torch.cat(out).numpy()


def bench_image_models(args: argparse.Namespace, images: list[Path]) -> None:
    import torch

    from hnm.encoders import build_image_encoder

    print(f"\n## Image encoders (CPU, {args.images} preprocessed 256x256 demo views; "
          f"bf16/fp16: the first {args.slow_images}; best of {args.repeats})\n")
    print("| encoder | layout, batch norms, images per pass | precision | threads | img/s "
          "| min cosine to fp32 |")
    print("|---|---|---|---|---|---|")
    variants = efficientnet_variants()
    pixels = _preprocessed(variants[next(iter(variants))][0], images[:args.images])
    before, _, before_cl = variants[next(iter(variants))]
    reference = run_variant(before, before_cl, pixels, 64, "fp32")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (encoder, rows, cl) in variants.items():
            for precision in args.precisions:
                x = pixels if precision == "fp32" else pixels[:args.slow_images]
                seconds, feats = timed(partial(run_variant, encoder, cl, x, rows, precision),
                                       args.repeats if precision == "fp32" else 1)
                cos = min_cosine(feats, reference[:len(x)])
                print(f"| efficientnet-lite0 | {name} | {precision} | {threads} | "
                      f"{len(x) / seconds:.1f} | {cos:.6f} |", flush=True)
        pix = build_image_encoder("pixels", torch.device("cpu"))
        x = _preprocessed(pix, images[:args.images])
        seconds, _ = timed(partial(pix.encode, x), args.repeats)
        print(f"| pixels | - | (exact) | {threads} | {len(x) / seconds:.1f} | 1 |", flush=True)
    torch.set_num_threads(1)


def _preprocessed(encoder: Any, paths: list[Path]) -> Any:
    import torch

    from hnm.embed import ImageFiles

    files = ImageFiles(paths, encoder.preprocess, 10**9)
    return torch.stack([files[i] for i in range(len(paths))])


def bench_text_model(args: argparse.Namespace) -> None:
    import torch

    from hnm.embed import embed_texts, phrase_order
    from hnm.encoders import build_text_encoder
    from hnm.plan import TEXT_BATCH

    phrases = make_phrases(args.phrases)
    print(f"\n## Text encoder (minilm, CPU, {len(phrases)} phrases; bf16/fp16: the first "
          f"{args.slow_phrases})\n")
    print("| order, batch | precision | threads | phrases/s | min cosine to fp32 |")
    print("|---|---|---|---|---|")
    reference = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in args.precisions:
            encoder = build_text_encoder("minilm", torch.device("cpu"), precision)
            texts = phrases if precision == "fp32" else phrases[:args.slow_phrases]
            by_length = [texts[i] for i in phrase_order(texts)]
            for label, items, batch in (("input order, 64 (before)", texts, 64),
                                        (f"by length, {TEXT_BATCH} (now)", by_length,
                                         TEXT_BATCH)):
                seconds, got = timed(partial(embed_texts, encoder, items, batch), 1)
                if label.startswith("by length"):
                    got = got[np.argsort(phrase_order(texts))]
                if reference is None:
                    reference = got
                cos = min_cosine(got, reference[:len(got)])
                print(f"| {label} | {precision} | {threads} | {len(texts) / seconds:.1f} | "
                      f"{cos:.6f} |", flush=True)
    torch.set_num_threads(1)


def bench_formats(args: argparse.Namespace, images: dict[str, list[Path]]) -> None:
    """Decoding + preprocessing per format, and embed_images end to end (one thread, as a
    CPU worker runs it)."""
    import torch

    from hnm.embed import ImageFiles, embed_images
    from hnm.encoders import build_image_encoder

    torch.set_num_threads(1)
    encoder = build_image_encoder("efficientnet-lite0", torch.device("cpu"))
    print(f"\n## Decoding and embedding per format ({args.images} images, efficientnet-lite0 "
          "preprocessing, one thread)\n")
    print("| format | decode + preprocess img/s | embed_images img/s (fp32, now) |")
    print("|---|---|---|")
    for name, paths in images.items():
        paths = paths[:args.images]
        for draft in ((None, encoder.draft_size) if name == "jpeg-4x" else (encoder.draft_size,)):
            files = ImageFiles(paths, encoder.preprocess, 10**9, draft)
            seconds, _ = timed(partial(_decode_all, files), args.repeats)
            label = f"{name}{' (draft)' if draft and name == 'jpeg-4x' else ''}"
            embed_s = ""
            if draft == encoder.draft_size:
                t, _ = timed(partial(embed_images, encoder, paths, 64, 0, 10**9), 1)
                embed_s = f"{len(paths) / t:.1f}"
            print(f"| {label} | {len(paths) / seconds:.0f} | {embed_s} |", flush=True)
        if name.startswith("jpeg"):
            _simplejpeg_row(name, paths, encoder, args.repeats)


def _decode_all(files: Any) -> list[Any]:
    return [files[i] for i in range(len(files))]


def _simplejpeg_row(name: str, paths: list[Path], encoder: Any, repeats: int) -> None:
    """The alternative to PIL's draft mode: libjpeg-turbo through simplejpeg, reduced to
    at least the model's input size, if that package is installed."""
    try:
        import simplejpeg
    except ImportError:
        return
    from PIL import Image

    def decode_all() -> list[Any]:
        size = encoder.draft_size
        return [encoder.preprocess(Image.fromarray(simplejpeg.decode_jpeg(
            p.read_bytes(), colorspace="RGB", min_height=size, min_width=size)))
            for p in paths]

    seconds, _ = timed(decode_all, repeats)
    print(f"| {name} (simplejpeg) | {len(paths) / seconds:.0f} | |", flush=True)


# ---------------------------------------------------------------- whole runs


def launch(repo: Path, args: list[str]) -> float:
    """Wall seconds of one `python launch.py ...` run of `repo`'s code (must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "launch.py", "--quiet", *args], cwd=repo, check=True,
                   stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)})
    return time.perf_counter() - t0


def whole_runs(args: argparse.Namespace, tmp: Path) -> None:
    """launch.py on the demo generator scaled up, each setting in turn, `repeats` rounds."""
    from hnm.demo import make_demo

    data = tmp / "runs_data"
    make_demo(data, num_dialogs=args.run_images // 5, image_size=args.image_size)
    base = ["--config", "configs/demo.yaml", "--annotations", str(data / "annotations.json"),
            "--image-dir", str(data), "--batch-size", "64"]
    known = {"default": (ROOT, []),
             "fp32-1": (ROOT, ["--precision", "fp32", "--cpu-workers", "1"]),
             "bf16": (ROOT, ["--precision", "bf16"]),
             "baseline": (Path(args.baseline_repo or ROOT), [])}
    settings = {f"{name}: {' '.join(known[name][1]) or 'no flags'}"
                + (f" ({args.baseline_repo})" if name == "baseline" else ""): known[name]
                for name in args.run_settings.split(",")}
    times: dict[str, list[float]] = {k: [] for k in settings}
    embed_s: dict[str, list[float]] = {k: [] for k in settings}
    phases: dict[str, dict] = {}
    for _ in range(args.run_repeats):  # interleaved: machine noise hits every setting alike
        for name, (repo, flags) in settings.items():
            out = tmp / f"run_{len(times[name])}"
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(launch(repo, [*base, *flags, "--output-dir", str(out)]))
            phases[name] = json.loads((out / "metrics.json").read_text())["timing"]
            # the embed phase lasts as long as its slowest shard's images
            embed_s[name].append(max(json.loads(m.read_text())["embed_images"]
                                     for m in out.glob("embeddings/done_*")))
    n = args.run_images
    print(f"\n## Whole runs: launch.py on {n} generated {args.image_size}x{args.image_size} "
          f"demo images (batch 64), medians of {args.run_repeats}, interleaved\n")
    print("| setting | wall s | samples/s | embed phase img/s | runs (wall s) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {n / med:.1f} | "
              f"{n / statistics.median(embed_s[name]):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    print("\nphases of the last run of each (summed over workers):")
    for name in settings:
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases[name].items()))


def demo_quality(args: argparse.Namespace, tmp: Path) -> None:
    """The bundled demo mined in fp32 and in the default precision (and bf16): picks that
    change, success rate, mean hard visual similarity."""
    from hnm.demo import make_demo

    make_demo(tmp / "demo")
    base = ["--config", "configs/demo.yaml", "--annotations", str(tmp / "demo/annotations.json"),
            "--image-dir", str(tmp / "demo")]
    runs = {"fp32": (ROOT, ["--precision", "fp32"]), "default": (ROOT, []),
            "bf16": (ROOT, ["--precision", "bf16"])}
    if args.baseline_repo:
        runs["release before"] = (Path(args.baseline_repo), [])
    picks, figures = {}, {}
    for name, (repo, flags) in runs.items():
        out = tmp / f"quality_{name.replace(' ', '_')}"
        launch(repo, [*base, *flags, "--output-dir", str(out)])
        rows = [json.loads(line) for line in (out / "negatives.jsonl").read_text().splitlines()]
        picks[name] = [tuple(n["id"] for n in r["negatives"]) for r in rows]
        g = json.loads((out / "metrics.json").read_text())["global"]
        figures[name] = (g["success_rate"], g["hard_visual_similarity"]["mean"],
                         json.loads((out / "metrics.json").read_text())["provenance"]
                         .get("precision", "fp32"))
    print(f"\n## Quality on the demo ({len(picks['fp32'])} anchors)\n")
    print("| run | precision | anchors whose picks differ from fp32 | success rate | "
          "mean hard visual similarity |")
    print("|---|---|---|---|---|")
    for name, (rate, vis, prec) in figures.items():
        changed = sum(a != b for a, b in zip(picks[name], picks["fp32"]))
        print(f"| {name} | {prec} | {changed} | {100 * rate:.1f}% | {vis:.4f} |")


# ---------------------------------------------------------------- main


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"machine: {len(os.sched_getaffinity(0))} usable cores ({cpu}, torch CPU "
            f"capability {torch.backends.cpu.get_cpu_capability()}), Python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def bench_joint(args: argparse.Namespace, images: list[Path]) -> None:
    """One joint image-text model for both sides next to the two separate encoders
    (EfficientNet-Lite0 images, MiniLM texts), fp32, as the pipeline runs them on CPU:
    images CPU_ROWS_PER_PASS a pass, texts by length TEXT_BATCH a batch."""
    import torch

    from hnm.embed import CPU_ROWS_PER_PASS, embed_texts, phrase_order
    from hnm.encoders import build_image_encoder, build_text_encoder
    from hnm.joint import build_joint_model
    from hnm.plan import TEXT_BATCH

    cpu = torch.device("cpu")
    phrases = make_phrases(args.phrases)
    by_length = [phrases[i] for i in phrase_order(phrases)]
    print(f"\n## Joint model against the two separate encoders (CPU, fp32, {args.images} "
          f"images, {len(phrases)} phrases; best of {args.repeats}; weights do not change "
          "the speed)\n")
    print("| model | images/s | phrases/s | threads |")
    print("|---|---|---|---|")

    def images_per_s(encoder: Any) -> float:
        x = _preprocessed(encoder, images[:args.images])
        seconds, _ = timed(lambda: [encoder.encode(p) for p in x.split(CPU_ROWS_PER_PASS)],
                           args.repeats)
        return len(x) / seconds

    def phrases_per_s(encoder: Any) -> float:
        seconds, _ = timed(partial(embed_texts, encoder, by_length, TEXT_BATCH), args.repeats)
        return len(phrases) / seconds

    for threads in args.threads:
        torch.set_num_threads(threads)
        image, text = build_image_encoder("efficientnet-lite0", cpu), \
            build_text_encoder("minilm", cpu)
        print(f"| efficientnet-lite0 + minilm (separate) | {images_per_s(image):.1f} | "
              f"{phrases_per_s(text):.1f} | {threads} |", flush=True)
        for spec in args.joint_models:
            joint = build_joint_model(spec, cpu)
            print(f"| {spec} | {images_per_s(joint):.1f} | {phrases_per_s(joint.text):.1f} | "
                  f"{threads} |", flush=True)
    torch.set_num_threads(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64, help="images per encoder timing")
    parser.add_argument("--slow-images", type=int, default=8,
                        help="images for bf16/fp16 on CPUs that emulate them")
    parser.add_argument("--phrases", type=int, default=512)
    parser.add_argument("--slow-phrases", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--threads", default=",".join(
        str(t) for t in sorted({1, len(os.sched_getaffinity(0))})))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--run-images", type=int, default=2000, help="images of a whole run")
    parser.add_argument("--run-repeats", type=int, default=3)
    parser.add_argument("--baseline-repo", help="a checkout of an earlier hnm, for the "
                        "'baseline' whole run and the quality table")
    parser.add_argument("--run-settings", default="default,fp32-1",
                        help="whole runs to time, of default, fp32-1 (--precision fp32 "
                        "--cpu-workers 1), bf16, baseline (--baseline-repo's code)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: "
                        "models,text,formats,runs,quality,joint")
    parser.add_argument("--joint-models", default="open_clip:ViT-B-32",
                        help="comma-separated --joint-model specs timed against the two "
                        "separate encoders (open_clip:ARCH without weights: random ones)")
    args = parser.parse_args()
    args.precisions = args.precisions.split(",")
    args.joint_models = [m for m in args.joint_models.split(",") if m]
    args.threads = [int(t) for t in args.threads.split(",")]
    skip = set(args.skip.split(","))
    print(machine())
    tmp = Path(tempfile.mkdtemp(prefix="hnm_bench_embed_"))
    try:
        if not {"models", "formats", "joint"} <= skip:
            images = make_images(tmp / "images", args.images, args.image_size)
        if "models" not in skip:
            bench_image_models(args, images["png"])
        if "text" not in skip:
            bench_text_model(args)
        if "joint" not in skip:
            bench_joint(args, images["png"])
        if "formats" not in skip:
            bench_formats(args, images)
        if "runs" not in skip:
            whole_runs(args, tmp)
        if "quality" not in skip:
            demo_quality(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
