"""Listing WebDataset tars: the header walk against ``tarfile``, in threads and in processes.

Writes ``--tars`` tars of ``--per-tar`` samples (``<key>.jpg`` of ``--bytes`` bytes + ``<key>.cls``, as
img2dataset lays them out), then times, over the same files:

- ``tarfile``: one tar after another streamed through ``tarfile`` (how tars were listed before the walk);
- ``walk``: ``webdataset.scan_tar_file`` one tar after another (one core);
- ``list_shards``: the source's listing as a job does it, with the tars in threads
  (``LIST_PROCESSES_FROM`` above the tar count) and in spawned processes.

    python -m bench.tar_listing --tars 100 --per-tar 10000      # a million samples
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

from pipeline.inputs import webdataset
from pipeline.runtime.storage import resolve


def write_tars(root: Path, tars: int, per_tar: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    payload = bytes(size)
    for t in range(tars):
        path = root / f"{t:05d}.tar"
        if path.exists():
            continue
        with tarfile.open(f"{path}.part", "w") as tar:
            for k in range(per_tar):
                key = f"{t * per_tar + k:09d}"
                for ext, data in (("jpg", payload), ("cls", b"7")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(f"{path}.part", path)


def tarfile_listing(path: Path) -> int:
    """Samples of one tar as ``tarfile`` streams it (the reference: every header, data read through)."""
    samples, last = 0, None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            key = webdataset.sample_key(info.name)[0]
            if info.isfile() and key != last:
                samples, last = samples + 1, key
    return samples


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/tar-listing"))
    p.add_argument("--tars", type=int, default=100)
    p.add_argument("--per-tar", type=int, default=10_000)
    p.add_argument("--bytes", type=int, default=1, help="bytes of each sample's image member")
    p.add_argument("--reference-tars", type=int, default=10, help="tars the tarfile reference reads")
    args = p.parse_args()
    write_tars(args.root, args.tars, args.per_tar, args.bytes)
    tars = sorted(args.root.glob("*.tar"))[: args.tars]
    ref = tars[: args.reference_tars]
    loc = resolve(str(args.root))
    figures: dict = {"tars": len(tars), "samples": len(tars) * args.per_tar, "cpus": os.cpu_count()}
    s, n = timed(lambda: sum(tarfile_listing(t) for t in ref))
    figures["tarfile_us_per_sample"] = round(s / n * 1e6, 2)
    s, n = timed(lambda: sum(len(webdataset.scan_tar_file(loc, t.name).offsets) for t in ref))
    figures["walk_us_per_sample"] = round(s / n * 1e6, 2)
    # lazy: the spawned listing processes import this module again; the sources module loads torch
    from pipeline.inputs import sources

    config = sources.SourceConfig(uri=str(args.root), shard_size=1000)
    for name, start in (("threads", len(tars) + 1), ("processes", 1)):
        sources.LIST_PROCESSES_FROM = start
        s, _ = timed(lambda: len(sources.list_shards(config)))
        figures[f"list_shards_{name}_s"] = round(s, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
