"""What checking a ``torch.save`` file's CRC-32s costs, next to ``torch.load`` of the same file.

``torch.load`` never checks the CRC-32 that ``torch.save`` writes for every archive member, so the decoded-image
caches are verified with :func:`lit_meta.datamodules.files.torch_file_problem` before they are loaded. Timed here,
ms per call, median of ``--repeats`` after one warm-up, files in the page cache (a cold read costs both the same
disk time on top), one torch thread:

* the real Omniglot cache (built with the DataModule's cache function into a temporary folder, or taken from
  ``--cache-dir``);
* a Lightning-like checkpoint of Conv-4 (64 channels, 5 outputs): state_dict + an Adam optimizer state;
* (not with ``--quick``) a synthetic uint8 tensor the size of a Mini-ImageNet val/test split cache
  ([16, 600, 3, 84, 84], 203 MB), as the largest caches are.

    python benchmarks/integrity_cost.py            # a few seconds
    python benchmarks/integrity_cost.py --quick

Data: $LIT_META_DATA/omniglot (default ../shared/data/omniglot).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from lit_meta.datamodules import omniglot as omni
from lit_meta.datamodules.files import atomic_torch_save, torch_file_problem
from lit_meta.nets import Conv4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, median_ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def omniglot_cache(data_dir: Path, cache_dir: Path) -> Path:
    """The Omniglot cache file in ``cache_dir``, built there by :func:`omni.cached_decode` if it is missing."""
    zips = omni.find_zips(data_dir, "auto")
    if zips is None:
        raise SystemExit(f"no Omniglot zips in {data_dir}: set LIT_META_DATA or --data-dir")
    omni.cached_decode(zips, 28, cache_dir)
    return max(cache_dir.glob("omniglot-28px-*.pt"), key=lambda p: p.stat().st_mtime)


def conv4_checkpoint(path: Path) -> Path:
    """A Lightning-like checkpoint of Conv-4 (64 channels, 5 outputs) after one Adam step."""
    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden=64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 1, 28, 28)).square().mean().backward()
    optimizer.step()
    atomic_torch_save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.x",
                       "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                       "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [], "callbacks": {},
                       "hyper_parameters": {"hidden": 64, "n_way": 5}}, path)
    return path


def split_sized_cache(path: Path) -> Path:
    """A uint8 tensor the shape of a Mini-ImageNet val/test split cache, saved as the cache is."""
    images = torch.randint(0, 256, (16, 600, 3, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    atomic_torch_save({"images": images, "classes": [f"n{i:08d}" for i in range(16)]}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--cache-dir", default=None,
                        help="Omniglot cache folder to use (the newest omniglot-28px-*.pt there; built if missing); "
                             "default: a temporary folder")
    parser.add_argument("--quick", action="store_true", help="3 repeats, no Mini-ImageNet-sized file")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    torch.set_num_threads(1)
    data = Path(args.data_dir or Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")

    print(machine_line())
    print(f"ms per call, median of {args.repeats} after a warm-up, files in the page cache")
    print(f"{'file':<40} | {'MB':>7} | {'torch.load ms':>13} | {'CRC check ms':>12} | {'check / load':>12}")
    with tempfile.TemporaryDirectory(prefix="integrity_cost-") as tmp:
        files = {"Omniglot cache (uint8 images)": omniglot_cache(data, Path(args.cache_dir or tmp)),
                 "Conv-4 checkpoint (+ Adam state)": conv4_checkpoint(Path(tmp) / "conv4.ckpt")}
        if not args.quick:
            files["Mini-ImageNet split-sized cache"] = split_sized_cache(Path(tmp) / "split.pt")
        for name, path in files.items():
            if torch_file_problem(path) is not None:
                raise SystemExit(f"{path} does not check out: {torch_file_problem(path)}")
            load = median_ms(lambda: torch.load(path, weights_only=True), args.repeats)
            check = median_ms(lambda: torch_file_problem(path), args.repeats)
            size = path.stat().st_size / 1e6
            print(f"{name:<40} | {size:>7.2f} | {load:>13.2f} | {check:>12.2f} | {check / load:>11.2f}x")


if __name__ == "__main__":
    main()
