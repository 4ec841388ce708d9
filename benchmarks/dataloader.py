"""Dataloader throughput: images per CPU-second of the training input pipeline on the same JPEGs, several ways.

  raw decode         torchvision.io.decode_image over the JPEG bytes in memory, one process: the ceiling
  ours               dsincubate.data WebDataset shards -> decode -> augment -> batch (DataLoader workers)
  ImageFolder+PIL    torchvision ImageFolder with PIL loading and the same timm transform (DataLoader workers)
  decode+transform   our decode and the same per-sample transform in one loop, one process: the work floor of a
                     recipe (no tar reading, shuffling, batching or worker hand-off)
  DALI cpu           data.backend=dali on the same shards with the same DataConfig (only `backend` differs):
                     DALI's CPU operators with --workers threads; "decode+crop+flip" is the DeiT recipe without
                     RandAugment/erasing (what a GPU pipeline leaves on the CPU)
  DALI gpu           (CUDA hosts, --backend dali or all) the mixed pipeline into GPU memory; host_cores_used =
                     CPU-seconds per wall second
  ours N epochs      (torch) --epochs epochs of recipe "none", a loader built per epoch as the trainer does: the
                     workers started once and kept (persistent, the default) against started every epoch (before)
Every row also gives the cores one H100 needs at 3,000 images/s (ViT-B/16 bf16) = 3000 / images per CPU-second.
DALI rows' img/CPU-s leave out the pipeline's build (measured apart: build_cpu_s; with it: img_per_cpu_s_with_build).

Each pipeline is measured with recipe "none" (decode, resize, center crop, normalize) and "deit" (timm's DeiT
training augmentation: RandomResizedCrop, flip, RandAugment, random erasing). Per-core rate = images / CPU seconds
of the main process plus its workers (getrusage), so it does not depend on how busy the other cores are; wall
rates are reported too. Targets: ours >= 80% of the raw decode rate per core, and clearly ahead of ImageFolder.
"ours / floor" is the share of the loader's CPU time spent on the recipe's own work: what the loader machinery costs.

    python benchmarks/dataloader.py [--images 2000] [--size 224] [--workers 2] [--workdir /tmp/dsinc_bench]
    python benchmarks/dataloader.py --jpeg-size 500x375 --out benchmarks/results/dataloader_cpu2_500x375.json
    python benchmarks/dataloader.py --backend dali --jpeg-size 500x375   # DALI rows only (gpu_session.sh); on
                                                   # a CUDA host the mixed pipeline's (--dali-cpu: also the CPU ones)

JPEGs are --size square by default; --jpeg-size WxH writes larger ones (ImageNet's are ~500x375 on average), where
decoding takes a larger share of the pipeline while the augmentation, which works at --size, costs the same.

Prints a table and writes benchmarks/results/dataloader_<host-kind>_<date>.json (+ .txt with the table) with the
machine (the CPU, also on a GPU host), command, commit and date (`benchmarks.common`).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from dsincubate.data import DataConfig, build_train_loader, resolve_data  # noqa: E402
from dsincubate.data.loader import close_pools  # noqa: E402
from dsincubate.data.synth import jpeg_folder  # noqa: E402
from dsincubate.data.transforms import build_transform, decode  # noqa: E402
from dsincubate.data.writer import convert  # noqa: E402


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(fn) -> dict:
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = fn()
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "img_per_s": round(n / wall, 1),
            "img_per_cpu_s": round(n / cpu, 1)}


def read_all(paths) -> list[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


def raw_decode(paths) -> int:
    datas = read_all(paths)
    torch.set_num_threads(1)
    for d in datas:
        decode(d)
    return len(datas)


def raw_decode_pil(paths) -> int:
    from PIL import Image
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")
    return len(paths)


def work_floor(paths, recipe: str, args) -> int:
    """Decode + the recipe's transform into uint8 batch slots, then the per-batch normalize (+ erasing): the
    pipeline minus the loader (tar reading, shuffle buffer, workers, hand-off)."""
    cfg = DataConfig(recipe=recipe)
    tf = build_transform(recipe, cfg, img_size=args.size, train=True)
    datas = read_all(paths)
    torch.set_num_threads(1)
    batch = torch.empty(args.batch, 3, args.size, args.size, dtype=torch.uint8)
    for i, d in enumerate(datas):
        tf(decode(d), batch[i % args.batch])
        if i % args.batch == args.batch - 1:
            tf.batch_prep(batch, "cpu", [0, 0, 0, i])
    return len(datas)


# The loader rows: (row name, recipe, extra DataConfig fields). Each runs on the torch backend and on DALI with the
# same shards and the same DataConfig apart from `backend` (loader_config; tests/unit/test_benchmarks.py checks it).
# "decode+crop+flip" is the DeiT recipe without RandAugment and erasing: what a GPU pipeline leaves on the CPU.
LOADER_ROWS = (("none", "none", {}), ("deit", "deit", {}),
               ("decode+crop+flip", "deit", {"auto_augment": "", "reprob": 0.0, "color_jitter": 0.0}))
# The epochs rows: the cheap recipe, where starting workers is the largest share of an epoch's cost
EPOCH_ROW = ("none", "none", {})
H100_IMAGES_PER_S = 3000  # ViT-B/16 bf16 training on one H100 (issue 22): the rate a loader must feed


def loader_config(shards: str, backend: str, recipe: str, extra: dict, workers: int) -> DataConfig:
    return DataConfig(train=shards, val=shards, recipe=recipe, num_workers=workers, resampled=False,
                      shuffle_buffer=256, backend=backend, **extra)


def dali_build_cost(cfg: DataConfig, shards: str, args) -> float:
    """CPU-seconds to build this row's DALI pipeline (RandAugment's conditional graph is most of it): paid once per
    epoch and rank, so it is taken out of the steady-state rate (an ImageNet epoch per rank is ~10^5 images)."""
    import glob

    from dsincubate.data.dali_loader import build_pipeline, parse_randaugment
    tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
    c0 = cpu_seconds()
    deit = cfg.recipe == "deit"
    build_pipeline(train=True, recipe=cfg.recipe, randaug=parse_randaugment(cfg.auto_augment) if deit else None,
                   jitter=cfg.color_jitter if deit else 0.0, paths=tars, idxs=[t[:-4] + ".idx" for t in tars],
                   batch_size=args.batch, img_size=args.size, threads=max(1, args.workers), device_id=None, seed=1)
    return cpu_seconds() - c0


def ours(cfg: DataConfig, args, device="cpu", epochs: int = 1, persistent: bool = True) -> int:
    """Images of `epochs` epochs, a loader built per epoch as the trainer does; the workers are stopped before it
    returns (getrusage counts a worker's CPU time once it has exited)."""
    info = resolve_data(cfg)
    n = 0
    for epoch in range(epochs):
        dl = build_train_loader(cfg, info, batch_size=args.batch, rank=0, world_size=1, epoch=epoch, seed=0,
                                img_size=args.size, device=device, persistent=persistent)
        for x, _ in dl:
            n += x.shape[0]
    if device != "cpu":
        torch.cuda.synchronize()  # the images are in GPU memory when counted
    close_pools()
    return n


def imagefolder(folder: str, recipe: str, args) -> int:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    if recipe == "deit":
        tf = create_transform(args.size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                              re_mode="pixel", interpolation="bicubic")
    else:
        tf = create_transform(args.size, is_training=False, interpolation="bicubic", crop_pct=0.875)
    ds = ImageFolder(folder, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                     drop_last=True, generator=torch.Generator().manual_seed(0))
    n = 0
    for x, _ in dl:
        n += x.shape[0]
    return n


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224, help="training image size (and JPEG side by default)")
    ap.add_argument("--jpeg-size", default="", help="JPEG width x height, e.g. 500x375 (default: --size square)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (torch) / DALI threads")
    ap.add_argument("--backend", choices=("all", "torch", "dali"), default="all",
                    help="loader rows to run: both backends on the same shards and recipes (default), or one; "
                         "dali on a CUDA host runs the mixed (GPU) pipeline's rows only (add --dali-cpu for the "
                         "CPU ones; all runs both)")
    ap.add_argument("--dali-cpu", action="store_true", help="with --backend dali on a CUDA host: also DALI's CPU rows")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the persistent-vs-per-epoch workers rows (torch; "
                                                          "< 2 leaves them out)")
    ap.add_argument("--workdir", default="/tmp/dsinc_bench")
    ap.add_argument("--host-kind", default=None, help="name of the machine in the result file (default cpu<cores>)")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def recipe_rows(args, backends, dali_cpu: bool, paths, folder: str, shards: str, rows: dict, configs: dict) -> None:
    """Per recipe of LOADER_ROWS: the work floor, ours, DALI cpu (build cost apart) and ImageFolder rows."""
    for name, recipe, extra in LOADER_ROWS:
        if "torch" in backends and name != "decode+crop+flip":
            rows[f"decode+transform [{name}]"] = measure(lambda r=recipe: work_floor(paths, r, args))
        for backend in backends:
            if backend == "dali" and not dali_cpu:
                continue
            cfg = loader_config(shards, backend, recipe, extra, args.workers)
            row = f"{'ours webdataset' if backend == 'torch' else 'DALI cpu'} [{name}]"
            configs[row] = cfg
            rows[row] = {**measure(lambda c=cfg: ours(c, args)), "backend": backend, "recipe_row": name}
            if backend == "dali":
                build = dali_build_cost(cfg, shards, args)
                rows[row].update(build_cpu_s=round(build, 3), img_per_cpu_s_with_build=rows[row]["img_per_cpu_s"],
                                 img_per_cpu_s=round(rows[row]["images"] / max(1e-6, rows[row]["cpu_s"] - build), 1))
        if "torch" in backends and name != "decode+crop+flip":
            rows[f"ImageFolder+PIL [{name}]"] = measure(lambda r=recipe: imagefolder(folder, r, args))


def epoch_rows(args, shards: str, rows: dict, configs: dict) -> None:
    """Persistent workers (today's default) against workers started per epoch (the loader before them), over
    several epochs with each worker start-up inside the measurement."""
    for persistent in (False, True):
        cfg = loader_config(shards, "torch", EPOCH_ROW[1], EPOCH_ROW[2], args.workers)
        kind = "persistent workers" if persistent else "workers per epoch"
        row = f"ours [{EPOCH_ROW[0]}] {args.epochs} epochs, {kind}"
        configs[row] = cfg
        rows[row] = {**measure(lambda c=cfg, p=persistent: ours(c, args, epochs=args.epochs, persistent=p)),
                     "backend": "torch", "recipe_row": EPOCH_ROW[0], "epochs": args.epochs,
                     "persistent_workers": persistent}


def gpu_rows(args, shards: str, rows: dict, configs: dict) -> None:
    """The mixed pipeline: nvJPEG / hardware decode and GPU augmentation into this GPU's memory; CPU-seconds per
    wall second = the host cores it kept busy."""
    for name, recipe, extra in LOADER_ROWS:
        cfg = loader_config(shards, "dali", recipe, extra, args.workers)
        row = f"DALI gpu [{name}]"
        configs[row] = cfg
        r = measure(lambda c=cfg: ours(c, args, device="cuda"))
        rows[row] = {**r, "backend": "dali", "recipe_row": name, "device": torch.cuda.get_device_name(),
                     "host_cores_used": round(r["cpu_s"] / r["wall_s"], 2)}


def torch_targets(rows: dict) -> tuple[dict, list[str]]:
    """Ours against raw decode, the work floor and ImageFolder, per recipe (torch rows)."""
    targets, lines = {}, []
    for recipe in ("none", "deit"):
        o, f = rows[f"ours webdataset [{recipe}]"], rows[f"ImageFolder+PIL [{recipe}]"]
        floor = rows[f"decode+transform [{recipe}]"]
        targets[recipe] = {"ours_vs_raw_decode_per_core": o["vs_raw_decode"],
                           "ours_vs_work_floor_per_core": round(o["img_per_cpu_s"] / floor["img_per_cpu_s"], 3),
                           "work_floor_vs_raw_decode_per_core": floor["vs_raw_decode"],
                           "meets_80pct_of_raw_decode": o["vs_raw_decode"] >= 0.8,
                           "ours_vs_imagefolder_per_core": round(o["img_per_cpu_s"] / f["img_per_cpu_s"], 3),
                           "ahead_of_imagefolder": o["img_per_cpu_s"] > 1.1 * f["img_per_cpu_s"]}
        lines.append(f"[{recipe}] ours/raw decode = {o['vs_raw_decode']:.2f} (target 0.80: "
                     f"{'met' if targets[recipe]['meets_80pct_of_raw_decode'] else 'NOT met'}); ours/ImageFolder = "
                     f"{targets[recipe]['ours_vs_imagefolder_per_core']:.2f}; ours/work floor = "
                     f"{targets[recipe]['ours_vs_work_floor_per_core']:.2f} (the recipe's own work alone reaches "
                     f"{floor['vs_raw_decode']:.2f} of raw decode)")
    return targets, lines


def backend_targets(rows: dict, args) -> tuple[dict, list[str]]:
    """DALI cpu against torch per core (per recipe), and persistent against per-epoch workers, where measured."""
    targets, lines = {}, []
    for name, _, _ in LOADER_ROWS:
        t, d = rows.get(f"ours webdataset [{name}]"), rows.get(f"DALI cpu [{name}]")
        if t and d:
            ratio = round(d["img_per_cpu_s"] / t["img_per_cpu_s"], 2)
            targets[f"dali_vs_torch_per_core [{name}]"] = ratio
            lines.append(f"[{name}] DALI cpu / torch per core = {ratio:.2f} (issue 22 target for deit: >= 2)")
    epoch = [r for r in rows.values() if "persistent_workers" in r]
    if len(epoch) == 2:
        before, after = epoch
        targets["persistent_vs_per_epoch_workers"] = {
            "wall": round(after["img_per_s"] / before["img_per_s"], 3),
            "per_core": round(after["img_per_cpu_s"] / before["img_per_cpu_s"], 3)}
        lines.append(f"[{EPOCH_ROW[0]}] {args.epochs} epochs, persistent / per-epoch workers: wall "
                     f"{targets['persistent_vs_per_epoch_workers']['wall']:.2f}, per core "
                     f"{targets['persistent_vs_per_epoch_workers']['per_core']:.2f}")
    return targets, lines


def main() -> int:
    args = parse_args()
    machine = common.device(accelerator=False)  # the CPU, and the load average at the start (skews wall rates)
    backends = ("torch", "dali") if args.backend == "all" else (args.backend,)
    if "dali" in backends:
        from dsincubate.data.dali import require_dali
        require_dali()

    # on a GPU host `--backend dali` is the GPU check (benchmarks/gpu_session.sh, 45 s): the mixed pipeline only
    dali_cpu = args.backend == "all" or args.dali_cpu or not torch.cuda.is_available()
    w, h = (int(v) for v in args.jpeg_size.lower().split("x")) if args.jpeg_size else (args.size, args.size)
    tag = f"{args.size}" if (w, h) == (args.size, args.size) else f"{w}x{h}"
    folder = os.path.join(args.workdir, f"jpeg{tag}")
    paths = jpeg_folder(folder, args.images, size=w, height=h)
    shards = os.path.join(args.workdir, f"shards{tag}")
    convert(folder, shards, prefix="train", maxcount=250, progress=False)  # also writes DALI's index files
    # warm the page cache and imports so every row reads from memory
    raw_decode(paths[:50])
    if "dali" in backends:  # DALI's first RandAugment graph pays one-time imports and tracing (~2 CPU-s): not a row's
        dali_build_cost(loader_config(shards, "dali", "deit", {}, args.workers), shards, args)
    rows = {"raw decode (torchvision)": measure(lambda: raw_decode(paths))}
    configs = {}
    if "torch" in backends:
        rows["raw decode (PIL)"] = measure(lambda: raw_decode_pil(paths))
    recipe_rows(args, backends, dali_cpu, paths, folder, shards, rows, configs)
    if "torch" in backends and args.epochs > 1:
        epoch_rows(args, shards, rows, configs)
    if "dali" in backends and torch.cuda.is_available():
        gpu_rows(args, shards, rows, configs)
    ceiling = rows["raw decode (torchvision)"]["img_per_cpu_s"]
    for r in rows.values():
        r["vs_raw_decode"] = round(r["img_per_cpu_s"] / ceiling, 3)
        r["cores_per_h100"] = round(H100_IMAGES_PER_S / r["img_per_cpu_s"], 1)  # at 3,000 images/s

    lines = [f"{args.images} JPEGs {w}x{h} -> {args.size}px, batch {args.batch}, {args.workers} workers/threads, "
             f"{os.cpu_count()} cores",
             common.table(["pipeline", "img/s wall", "img/CPU-s", "vs raw", f"cores/H100@{H100_IMAGES_PER_S}"],
                          [[name, r["img_per_s"], r["img_per_cpu_s"], r["vs_raw_decode"], r["cores_per_h100"]]
                           for name, r in rows.items()],
                          ["", ".1f", ".1f", ".2f", ".1f"])]
    targets, more = torch_targets(rows) if "torch" in backends else ({}, [])
    both, more2 = backend_targets(rows, args)
    targets.update(both)
    text = "\n".join(lines + more + more2)
    print(text)
    record = common.header("dataloader", machine)
    record.update(settings=vars(args), results=rows, targets=targets,
                  row_configs={k: {f: getattr(c, f) for f in c.__dataclass_fields__} for k, c in configs.items()})
    path = common.write_result("dataloader", record, f"machine: {machine['name']}  ({record['date']})\n" + text,
                               args.out or None, kind=args.host_kind)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
