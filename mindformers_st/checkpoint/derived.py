"""Derived folders: what the load hook builds from a source once and reuses — Hugging Face
weights converted to `{output_dir}/ms_safetensors`, distributed weights merged into
`{output_dir}/unified_checkpoint`, `.ckpt` files copied to `{output_dir}/ckpt_safetensors`.

One protocol for all three (`build_derived_folder`), run together by every rank:
1. reuse the folder when the fingerprint it records equals the source's (file names, sizes,
   mtimes, options);
2. otherwise rank 0 makes an empty staging folder `<out>.building`; the `transform_process_num`
   builder ranks (MindSpore Transformers' choice: ranks 0, W/N, 2W/N, ... of W) each build
   their share of the content in it while the others wait; the ranks agree that every share
   succeeded (`agree_or_raise`: when one fails, all raise and the staging folder is removed);
3. rank 0 finishes (side files), writes the fingerprint and renames the staging folder into
   place, so the folder appears complete or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import ChecksumError, CheckpointError, ConfigError, MindformersSTError, write_failed
from ..parallel.agree import all_reduce_sum
from ..storage.atomic import atomic_write_text
from ..transform.execute import (commit_folder, execute_files, read_source_shapes,
                                 write_side_files)
from ..transform.planner import split_plan
from ..transform.verify import keys_to_verify

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "source_fingerprint.json"
LOAD_WORKERS = 2


def fingerprint(paths: Sequence[str], root: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """What identifies a source for a derived folder: its absolute root, every file's relative
    name, size and mtime, and the options of the derivation. Equal fingerprints mean the
    derived folder can be reused."""
    files: List[list] = []
    for p in sorted(set(paths)):
        st = os.stat(p)
        files.append([os.path.relpath(p, root), st.st_size, st.st_mtime_ns])
    return {"version": 1, "source": os.path.abspath(root), "files": files,
            "options": dict(options)}


def read_fingerprint(folder: str) -> Optional[Dict[str, Any]]:
    """The fingerprint a derived folder was built from, or None (absent or unreadable)."""
    try:
        with open(os.path.join(folder, FINGERPRINT_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def agree_or_raise(ctx, failure: Optional[BaseException], what: str) -> None:
    """Every rank raises when any rank failed (one all-reduce, also a barrier): the failing rank
    its own error, the others a CheckpointError saying so — a ChecksumError when some rank found
    corrupt bytes, so a resume on every rank falls back together. Each rank reads other files,
    and one that trained on would wait forever for the failed one in its first collective."""
    flags = np.array([failure is not None, isinstance(failure, ChecksumError)], dtype=np.int64)
    failed, corrupt = (int(x) for x in all_reduce_sum(ctx, flags))
    if not failed:
        return
    if failure is not None:
        raise failure
    kind = ChecksumError if corrupt else CheckpointError
    raise kind(f"{what}: {failed} other rank(s) could not read their part "
               f"({'corrupt data' if corrupt else 'see their log'}); nothing was loaded")


def rank_world(ctx):
    """(rank, world size) of `ctx`, (0, 1) without one."""
    return (0, 1) if ctx is None else (ctx.rank, ctx.world_size)


def transform_ranks(process_num: int, world: int) -> List[int]:
    """The ranks that build a derived folder for `transform_process_num` = `process_num` in a
    job of `world` ranks, as MindSpore Transformers chooses them (TransformCkpt): ranks 0,
    W/N, 2W/N, ...; more than `world` is lowered to `world` with a warning naming the key; a
    value that does not divide `world` (or is below 1) is a ConfigError."""
    if not isinstance(process_num, int) or isinstance(process_num, bool) or process_num < 1:
        raise ConfigError(f"config key 'transform_process_num' must be a whole number >= 1, "
                          f"got {process_num!r}")
    if process_num > world:
        logger.warning("config key 'transform_process_num' is %d but the job has %d rank(s): "
                       "%d used (as MindSpore Transformers)", process_num, world, world)
        process_num = world
    if world % process_num:
        raise ConfigError(f"config key 'transform_process_num' is {process_num}, which does not "
                          f"divide the job's {world} ranks (MindSpore Transformers' rule); use a "
                          f"divisor of {world}, e.g. 1 or {world}")
    return list(range(0, world, world // process_num))


def _barrier(ctx) -> None:
    if ctx is not None:
        ctx.barrier()


def build_derived_folder(out_dir: str, fp: Dict[str, Any], ctx, what: str,
                         build_share: Callable[[str, int, int], None],
                         finish: Optional[Callable[[str], None]] = None,
                         process_num: int = 1) -> bool:
    """Make `out_dir` hold what `build_share(staging, i, n)` writes on the n builder ranks
    (`transform_ranks(process_num, world)`; i is this rank's index among them), then
    `finish(staging)` on rank 0, for the source fingerprint `fp` — or reuse it when it records
    `fp` already (see the module doc). Every rank must call this. Returns True when rebuilt."""
    rank, world = rank_world(ctx)
    builders = transform_ranks(process_num, world)
    reuse = read_fingerprint(out_dir) == fp
    _barrier(ctx)   # every rank has decided before rank 0 may touch the folder
    if reuse:
        logger.info("%s: reusing %s (source unchanged)", what, out_dir)
        return False
    staging = out_dir.rstrip("/") + ".building"
    failure = None
    if rank == 0:
        logger.info("%s: building %s on %d of %d rank(s) (transform_process_num; ranks %s)",
                    what, out_dir, len(builders), world, builders)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.makedirs(staging)
        except OSError as exc:
            failure = write_failed(what, staging, exc)
    _barrier(ctx)
    if failure is None and rank in builders:
        try:
            build_share(staging, builders.index(rank), len(builders))
        except MindformersSTError as exc:
            failure = exc
        except OSError as exc:   # full, read-only...: one line naming the folder, not a traceback
            failure = write_failed(f"{what} into {os.path.basename(out_dir)}", staging, exc)
    try:   # also the barrier: every share is written past here
        agree_or_raise(ctx, failure, f"{what}: building {out_dir}")
        if rank == 0:
            if finish is not None:
                finish(staging)
            atomic_write_text(os.path.join(staging, FINGERPRINT_FILE), json.dumps(fp, indent=1))
            commit_folder(staging, out_dir, overwrite=True)
    except BaseException as exc:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(f"{what} into {os.path.basename(out_dir)}", out_dir, exc) from exc
        raise
    _barrier(ctx)
    return True


def build_shared_folder(out_dir: str, fp: Dict[str, Any], plan, ctx, what: str,
                        verify: str = "read", process_num: int = 1) -> bool:
    """`build_derived_folder` for a transform plan: its files split over the builder ranks
    (`split_plan`; `process_num` is transform_process_num), source checksums checked per
    `verify` as decided on the whole plan, rank 0 adding the side files once every file is
    there."""
    def build_share(staging: str, index: int, count: int) -> None:
        keys = keys_to_verify(plan, read_source_shapes(plan), verify)
        execute_files(split_plan(plan, count)[index], staging, workers=LOAD_WORKERS,
                      progress=False, verify_keys=keys)

    def finish(staging: str) -> None:
        absent = [f.path for f in plan.files if not os.path.isfile(os.path.join(staging, f.path))]
        if absent:   # a rank that did not take part must never yield a half folder
            raise CheckpointError(f"{what}: {len(absent)} file(s) of {out_dir} were not written "
                                  f"(e.g. {absent[0]}); every rank must run the load hook")
        write_side_files(plan, staging)

    return build_derived_folder(out_dir, fp, ctx, what, build_share, finish, process_num)
